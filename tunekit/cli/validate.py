"""``tunekit validate <config> [--recipe R] [overrides]``: check a config without running anything.

The config is checked against every recipe it names in its ``# recipe: <name>`` lines (or the one
given with ``--recipe``): every key the recipe reads, with its type and range, no key it would
ignore, and the arguments of every ``_component_`` (docs/cli.md).
"""

from __future__ import annotations

import argparse

from tunekit.config import load, validate
from tunekit.config.catalog import config_recipes, find_config, find_recipe, recipe_schema


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("validate", help="check a config against its recipe: keys, types, components")
    p.add_argument("config", help="config name like tiny/lora or a .yaml path")
    p.add_argument("overrides", nargs="*", help="key=value, ~key (delete), +key=value (add)")
    p.add_argument("--recipe", help="the recipe that will run it (default: the config's '# recipe:' lines)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = find_config(args.config)
    names = [args.recipe] if args.recipe else config_recipes(path)
    schemas = [(name, recipe_schema(find_recipe(name))) for name in names]
    cfg = load(path, args.overrides)
    validate(cfg, schemas=[(n, s) for n, s in schemas if s is not None], source=args.config)
    checked = [n for n, s in schemas if s is not None]
    if checked:
        print(f"{args.config}: config is valid for {', '.join(checked)}")
    else:
        print(f"{args.config}: components are valid (no recipe named: add a '# recipe: <name>' line or pass "
              "--recipe to check every key)")
    return 0
