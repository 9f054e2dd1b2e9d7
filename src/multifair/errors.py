"""One exception type for user mistakes: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A mistake in user input (config, file, argument). Its message names what and where."""
