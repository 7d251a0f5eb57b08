"""The built-in recipes and configs, discovered from the files on disk (no hand-kept registry).

A recipe is ``recipes/<name>.py`` (files starting with ``_`` are helpers, not recipes). A config
is ``recipes/configs/<family>/<name>.yaml``, named ``<family>/<name>``; its leading comment lines
name the recipes it is written for, one ``# recipe: <name>`` line each.
"""

from __future__ import annotations

import ast
import re
import runpy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunekit import _paths
from tunekit.config.errors import ConfigError, did_you_mean

_RECIPE_LINE = re.compile(r"#\s*recipe:\s*(\S+)")
_YAML_SUFFIXES = (".yaml", ".yml")


def builtin_recipes(recipes_dir: Path | None = None) -> dict[str, Path]:
    """Recipe name -> file, sorted by name."""
    root = recipes_dir or _paths.recipes_dir()
    return {p.stem: p for p in sorted(root.glob("*.py")) if not p.name.startswith("_")}


def builtin_configs(configs_dir: Path | None = None) -> dict[str, Path]:
    """Config name (``family/name``) -> file, sorted by name."""
    root = configs_dir or _paths.configs_dir()
    files = [p for suffix in _YAML_SUFFIXES for p in root.rglob(f"*{suffix}")] if root.is_dir() else []
    return dict(sorted((p.relative_to(root).with_suffix("").as_posix(), p) for p in files))


def config_recipes(path: Path) -> list[str]:
    """The recipe names in the ``# recipe: <name>`` lines of the config's leading comments."""
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                break  # the header ends at the first YAML line
            if m := _RECIPE_LINE.fullmatch(line):
                names.append(m.group(1))
    return names


def find_config(name_or_path: str | Path) -> Path:
    """Resolve a built-in config name (``tiny/lora``) or a path to a ``.yaml`` file."""
    path = Path(name_or_path)
    if path.is_file():
        return path.resolve()
    builtin = builtin_configs()
    name = path.with_suffix("").as_posix() if path.suffix in _YAML_SUFFIXES else str(name_or_path)
    if name in builtin:
        return builtin[name]
    if path.suffix in _YAML_SUFFIXES:
        raise ConfigError(f"config file {name_or_path} not found{did_you_mean(name, builtin)}")
    raise ConfigError(f"no built-in config named {name_or_path!r}{did_you_mean(name, builtin)} "
                      "(`tunekit ls` lists them; a path to a .yaml file works too)")


def find_recipe(name_or_path: str | Path) -> Path:
    """Resolve a built-in recipe name (``lora_finetune_single_device``) or a path to a ``.py`` file."""
    path = Path(name_or_path)
    builtin = builtin_recipes()
    if path.suffix == ".py":
        if path.is_file():
            return path.resolve()
        raise ConfigError(f"recipe file {name_or_path} not found")
    if str(name_or_path) in builtin:
        return builtin[str(name_or_path)]
    raise ConfigError(f"no built-in recipe named {name_or_path!r}{did_you_mean(str(name_or_path), builtin)} "
                      "(`tunekit ls` lists them; a path to a .py file works too)")


def recipe_schema(recipe: Path) -> Mapping[str, Any] | None:
    """The ``CONFIG`` a recipe file declares (the keys it reads, ``tunekit.config.schema``), found by
    running the file's top level (its imports and definitions, not ``main``); None for a forked
    recipe that declares none (then only its components are checked, and the file is not run)."""
    tree = ast.parse(recipe.read_text(encoding="utf-8"), str(recipe))
    declares = any(isinstance(node, (ast.Assign, ast.AnnAssign)) and "CONFIG" in
                   [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)] for node in tree.body)
    if not declares:
        return None
    old_path = list(sys.path)
    sys.path.insert(0, str(recipe.parent))  # as `python recipe.py` would: forked recipes may import a sibling
    try:
        namespace = runpy.run_path(str(recipe), run_name=f"tunekit_recipe_{recipe.stem}")
    finally:
        sys.path[:] = old_path
    schema = namespace.get("CONFIG")
    return schema if isinstance(schema, Mapping) else None
