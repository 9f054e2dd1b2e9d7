"""The `multifair` command. Each sub-command lives in its own module exposing

    add_parser(subparsers) -> None   # registers the sub-command and sets `func=run`
    run(args) -> int                 # the exit status

A user mistake (`UserError`) prints one line on stderr and exits 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Sequence

from multifair import __version__
from multifair.errors import Stopped, UserError

_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}

# Sub-command modules, in the order `multifair --help` lists them.
COMMAND_MODULES: list[str] = [
    "multifair.training.cli",
    "multifair.data.cli",
    "multifair.evaluation.audit",
    "multifair.evaluation.benchmark_cli",
    "multifair.evaluation.diagnose_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multifair",
        description="Train and audit multimodal medical classifiers that are balanced across "
        "modalities and fair across demographic groups.",
    )
    parser.add_argument("--version", action="version", version=f"multifair {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"multifair {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        print(f"multifair {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # the machine, not the code: a read-only folder or a full disk where no write site
        # named it (those that do raise UserError)
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"multifair {args.command}: error: {where}{exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"multifair {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
