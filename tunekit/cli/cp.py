"""``tunekit cp <recipe|config> <dest>``: copy a built-in recipe or config to edit it."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from tunekit.cli.errors import UsageError
from tunekit.config.catalog import builtin_configs, builtin_recipes
from tunekit.config.errors import did_you_mean


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cp", help="copy a built-in recipe or config",
                              description="Copy a built-in recipe (.py) or config (.yaml) to edit it. "
                              "Run a copied recipe with `tunekit run ./my_recipe.py --config ./my.yaml`.")
    p.add_argument("name", help="recipe name (see `tunekit ls`) or config name like tiny/lora")
    p.add_argument("dest", help="destination file or directory")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=run)


def source_file(name: str) -> Path:
    recipes, configs = builtin_recipes(), builtin_configs()
    name = name.removesuffix(".py").removesuffix(".yaml")
    if name in recipes:
        return recipes[name]
    if name in configs:
        return configs[name]
    hint = did_you_mean(name, [*recipes, *configs])
    raise UsageError(f"no built-in recipe or config named {name!r}{hint} (`tunekit ls` lists them)")


def run(args: argparse.Namespace) -> int:
    src = source_file(args.name)
    dest = Path(args.dest)
    if args.dest.endswith(("/", os.sep)):  # `tunekit cp tiny/lora new_folder/`
        dest.mkdir(parents=True, exist_ok=True)
    if dest.is_dir():
        dest = dest / src.name
    elif not dest.suffix:  # `tunekit cp tiny/lora my_lora` -> my_lora.yaml
        dest = dest.with_suffix(src.suffix)
    if dest.exists() and not args.force:
        raise UsageError(f"{dest} already exists; pass --force to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"copied {args.name} to {dest}")
    return 0
