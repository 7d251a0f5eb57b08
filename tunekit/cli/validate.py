"""``tunekit validate <config> [overrides]``: check a config without running anything."""

from __future__ import annotations

import argparse

from tunekit.config import load, validate


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("validate", help="check a config: imports, argument names, missing values")
    p.add_argument("config", help="config name like tiny/lora or a .yaml path")
    p.add_argument("overrides", nargs="*", help="key=value, ~key (delete), +key=value (add)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    validate(load(args.config, args.overrides), source=args.config)
    print(f"{args.config}: config is valid")
    return 0
