"""The error a subcommand raises for a mistake the user can fix (printed as one line, exit 2)."""


class UsageError(Exception):
    """A command-line mistake: the message says what is wrong and how to fix it."""
