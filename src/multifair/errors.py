"""User mistakes and clean stops: the CLI prints the message on one line and exits 2 (a
mistake) or 128 + the signal (a stop)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A mistake in user input (config, file, argument). Its message names what and where."""


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """An OSError while writing `path` (a read-only folder, a full disk) becomes one line
    naming it, instead of a traceback."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc})") from None


class Stopped(Exception):
    """The process was asked to stop (SIGTERM) and did so cleanly, e.g. after checkpointing.
    The CLI prints the message on one line and exits with `exit_code` (128 + the signal)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
