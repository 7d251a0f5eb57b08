"""Where the built-in recipes and configs live, installed or in a source checkout."""

from pathlib import Path


def recipes_dir() -> Path:
    """Directory holding the built-in recipe scripts and ``configs/``."""
    here = Path(__file__).resolve().parent
    installed = here / "recipes"  # a wheel install maps recipes/ to tunekit/recipes/
    if installed.is_dir():
        return installed
    return here.parent / "recipes"  # source checkout / editable install


def configs_dir() -> Path:
    return recipes_dir() / "configs"
