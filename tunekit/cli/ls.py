"""``tunekit ls``: the built-in recipes and the configs written for each."""

from __future__ import annotations

import argparse

from tunekit.config.catalog import builtin_configs, builtin_recipes, config_recipes


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ls", help="list built-in recipes and their configs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    recipes = builtin_recipes()
    configs_by_recipe: dict[str, list[str]] = {name: [] for name in recipes}
    unattached = []
    for config, path in builtin_configs().items():
        names = [n for n in config_recipes(path) if n in configs_by_recipe]
        for n in names:
            configs_by_recipe[n].append(config)
        if not names:
            unattached.append(config)
    rows = [(recipe, configs or ["-"]) for recipe, configs in configs_by_recipe.items()]
    if unattached:  # a config whose "# recipe:" line is absent or names no recipe on disk
        rows.append(("(no recipe)", unattached))
    width = max([len("RECIPE")] + [len(r) for r, _ in rows]) + 3
    print(f"{'RECIPE':<{width}}CONFIG")
    for recipe, configs in rows:
        for i, config in enumerate(configs):
            print(f"{recipe if i == 0 else '':<{width}}{config}")
    return 0
