"""tunekit: a small, pure-PyTorch toolkit for fine-tuning large language models."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # ``__version__`` is looked up on first use only: importlib.metadata costs ~30 ms of imports,
    # which every ``tunekit`` command and recipe would otherwise pay at startup.
    if name == "__version__":
        version = _version()
        globals()["__version__"] = version
        return version
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _version() -> str:
    """The installed distribution's version; from a source checkout that is not installed (only on
    ``sys.path``), the version in its pyproject.toml, so the two cannot disagree."""
    import importlib.metadata
    import re
    from pathlib import Path

    try:
        return importlib.metadata.version("tunekit")
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        # a regex, not tomllib (Python 3.11+): the first top-level `version = "..."` is [project]'s
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1) if match else "0+unknown"
