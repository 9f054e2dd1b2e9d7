"""User mistakes and clean stops: the CLI prints the message on one line and exits 2 (a
mistake) or 128 + the signal (a stop)."""


class UserError(Exception):
    """A mistake in user input (config, file, argument). Its message names what and where."""


class Stopped(Exception):
    """The process was asked to stop (SIGTERM) and did so cleanly, e.g. after checkpointing.
    The CLI prints the message on one line and exits with `exit_code` (128 + the signal)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
