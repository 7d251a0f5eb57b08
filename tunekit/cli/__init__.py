"""The ``tunekit`` command. Each subcommand lives in its own module; see ``tunekit.cli.main``."""
