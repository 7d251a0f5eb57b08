"""How tunekit reports mistakes a user can fix: one line per problem, naming the key and the fix."""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
from collections.abc import Iterable, Iterator


class UserError(ValueError):
    """A mistake the user can fix (a config key, a data file, a path, a checkpoint): the CLI and
    the recipes report it as one ``tunekit: error: ...`` line instead of a traceback.

    Raise it (or a subclass: ``ConfigError``, ``MissingFileError``, ``tunekit.data.DataError``,
    ``tunekit.checkpoint.CheckpointError``, ...) where the mistake is detected, with a message
    naming the culprit (key and value, file and line, tensor and shapes) and the fix. Anything
    else is a bug in tunekit and keeps its traceback: never catch a broad type to re-raise it as a
    UserError.
    """


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user pointed at (a checkpoint, a data file, a step folder) is not
    there; the message names the path and what was expected in it."""


class MissingPackageError(UserError, ImportError):
    """An optional package the requested feature needs is not installed; the message says what to
    pip install."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)


class ConfigError(UserError):
    """One or more problems in a config, its overrides, or a recipe/config name.

    ``problems`` holds one line per problem; ``str(err)`` lists them all.
    """

    def __init__(self, problems: str | Iterable[str], source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return where + self.problems[0]
        lines = [f"{where}{len(self.problems)} problems"] + [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the closest candidate, or ``""`` when nothing is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


@contextlib.contextmanager
def exit_on_user_error(*error_types: type[BaseException]) -> Iterator[None]:
    """Turn the given exceptions into ``tunekit: error: ...`` on stderr and exit code 2.

    Set ``TUNEKIT_DEBUG=1`` to get the full traceback instead.
    """
    try:
        yield
    except error_types as e:
        if os.environ.get("TUNEKIT_DEBUG") == "1":
            raise
        print(f"tunekit: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def user_errors() -> contextlib.AbstractContextManager[None]:
    """``with user_errors(): main(cfg)``: every :class:`UserError` (bad config, bad data, a step
    folder in the way) ends the run with one line and exit code 2, on every rank."""
    return exit_on_user_error(*USER_ERRORS)
