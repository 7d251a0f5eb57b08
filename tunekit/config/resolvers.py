"""The ``${asset:<name>}`` interpolation: absolute path of ``tunekit/assets/<name>``.

Shipped configs use it so they work from any working directory and after a non-editable install.
``<name>`` may go into the folder: ``${asset:tiny_llama/tokenizer.model}``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

import tunekit
from tunekit.config.errors import ConfigError, did_you_mean


def assets_dir() -> Path:
    return Path(tunekit.__file__).resolve().parent / "assets"


def asset_path(name: str) -> str:
    """Absolute path of the shipped asset ``name``; ``ConfigError`` if there is none."""
    path = assets_dir() / name
    if not path.exists():
        available = sorted(p.name for p in assets_dir().iterdir()) if assets_dir().is_dir() else []
        raise ConfigError(f"no shipped asset {name!r} in {assets_dir()}{did_you_mean(name, available)} "
                          f"(available: {', '.join(available) or 'none'})")
    return str(path)


def register_resolvers() -> None:
    """Register ``asset`` with omegaconf (idempotent)."""
    if not OmegaConf.has_resolver("asset"):
        # omegaconf 2.4 renamed register_new_resolver (2.3 has only the old name).
        register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
        register("asset", asset_path)
