"""``tunekit cat <config> [overrides]``: print the config with overrides and interpolations applied."""

from __future__ import annotations

import argparse

from omegaconf import OmegaConf

from tunekit.config import ConfigError, load


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("cat", help="print a config with overrides and interpolations resolved")
    p.add_argument("config", help="config name like tiny/lora or a .yaml path")
    p.add_argument("overrides", nargs="*", help="key=value, ~key (delete), +key=value (add)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config, args.overrides)
    try:
        text = OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    except Exception as e:  # an interpolation that does not resolve
        raise ConfigError(str(e).strip().splitlines()[0], source=args.config) from None
    print(text, end="")
    return 0
