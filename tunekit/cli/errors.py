"""The error a subcommand raises for a mistake the user can fix (printed as one line, exit 2)."""

from tunekit.config.errors import UserError


class UsageError(UserError):
    """A command-line mistake: the message says what is wrong and how to fix it."""
