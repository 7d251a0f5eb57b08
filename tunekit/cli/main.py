"""``tunekit <subcommand> ...``: the dispatcher.

Adding a subcommand: write ``tunekit/cli/<name>.py`` with ``add_parser(subparsers)``, which calls
``subparsers.add_parser(...)``, declares its arguments and sets ``func=<function(args) -> exit
code>`` with ``set_defaults``; then add ``<name>`` to ``SUBCOMMANDS`` below. Keep heavy imports
(torch, huggingface_hub) inside the functions so ``tunekit ls`` stays fast.

User mistakes (``ConfigError``, ``UsageError``) print one ``tunekit: error: ...`` line and exit 2;
``TUNEKIT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from tunekit.cli.errors import UsageError
from tunekit.config.errors import USER_ERRORS, exit_on_user_error

SUBCOMMANDS = ("ls", "cp", "cat", "validate", "run", "download", "data_check")


class _PrintVersion(argparse.Action):
    """``tunekit --version``; unlike argparse's "version" action, reads the version (package
    metadata, ~30 ms of imports) only when the option is given."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import tunekit

        print(f"tunekit {tunekit.__version__}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunekit", description="Fine-tune LLMs with plain PyTorch recipes.")
    parser.add_argument("--version", action=_PrintVersion)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name in SUBCOMMANDS:
        importlib.import_module(f"tunekit.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tunekit`` with ``argv`` (default ``sys.argv[1:]``); exits with the subcommand's code."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    with exit_on_user_error(*USER_ERRORS, UsageError):
        try:
            code = args.func(args)
        except BrokenPipeError:  # `tunekit ls | head`: the reader stopped early, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            code = 0
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
