"""What a run was: ``<output_dir>/config.yaml``, the config the run trained with (command-line
overrides applied, interpolations resolved), headed by a comment with the tunekit, torch, torchao
and Python versions. ``MetricLogger(..., config=cfg)`` writes it on rank 0 when training starts.

A resumed run keeps the record of the start it continues: ``config.yaml`` stays as it is, and when
the resumed run's config differs in anything but ``resume`` / ``resume_from`` (or it runs on other
versions), the resumed run's config is written next to it as ``config.step_<N>.yaml`` (``N``: the
step it resumed from). A fresh start (step 0) writes ``config.yaml`` anew.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

_HEADER = "# the resolved config of this run (overrides applied), written when it started at step {step}\n"
_VERSIONS = "# versions: {versions}\n"
# keys that only say how the run started: a resume that changes nothing else needs no new record
_START_KEYS = ("resume", "resume_from")


def library_versions() -> dict[str, str]:
    """``{"tunekit": ..., "torch": ..., "torchao": ..., "python": ...}`` (installed versions)."""
    versions = {}
    for name in ("tunekit", "torch", "torchao"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    if versions["tunekit"] == "not installed":  # a source checkout on sys.path
        import tunekit

        versions["tunekit"] = tunekit.__version__
    versions["python"] = platform.python_version()
    return versions


def resolved_config(cfg: DictConfig | dict) -> dict[str, Any]:
    """``cfg`` as plain containers with every interpolation resolved (``???`` values stay)."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _render(config: dict[str, Any], versions: dict[str, str], step: int) -> str:
    shown = ", ".join(f"{k} {v}" for k, v in versions.items())
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return _HEADER.format(step=step) + _VERSIONS.format(versions=shown) + body


def _same_run(text: str, config: dict[str, Any], versions: dict[str, str]) -> bool:
    """Whether the record ``text`` holds ``config`` (start keys aside) and ``versions``."""
    versions_line = next((line + "\n" for line in text.splitlines() if line.startswith("# versions: ")), "")
    if versions_line != _VERSIONS.format(versions=", ".join(f"{k} {v}" for k, v in versions.items())):
        return False
    try:
        old = yaml.safe_load(text)
    except yaml.YAMLError:  # edited by hand into something else: keep it, write ours beside it
        return False
    if not isinstance(old, dict):
        return False

    def core(c: dict) -> dict:
        return {k: v for k, v in c.items() if k not in _START_KEYS}

    # a round trip through YAML, so that both sides have the same types (tuples -> lists etc.)
    return core(old) == core(yaml.safe_load(yaml.safe_dump(config)))


def write_run_config(output_dir: str | Path, cfg: DictConfig | dict, *, step: int = 0) -> Path:
    """Write the run's record (module docstring) and return its path: ``config.yaml``, or
    ``config.step_<step>.yaml`` for a resume whose config or versions differ from the record;
    a resume without differences writes nothing and returns ``config.yaml``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config, versions = resolved_config(cfg), library_versions()
    path = output_dir / "config.yaml"
    if step > 0 and path.is_file():
        if _same_run(path.read_text(encoding="utf-8"), config, versions):
            return path
        path = output_dir / f"config.step_{step}.yaml"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_render(config, versions, step), encoding="utf-8")
    os.replace(tmp, path)  # never a half-written record
    return path
