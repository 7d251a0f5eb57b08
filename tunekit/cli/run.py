"""``tunekit run [torchrun options] <recipe> --config <name|path> [overrides]``.

Without torchrun options the recipe runs in this process, as ``python <recipe> --config ...``
would. With them (every option before the recipe, e.g. ``--nproc_per_node 2``) it is launched
through ``python -m torch.distributed.run``; only ``*_distributed.py`` recipes accept them. The
config is loaded and validated first, so a typo fails in a second, not after the launch.
"""

from __future__ import annotations

import argparse
import runpy
import subprocess
import sys
from pathlib import Path

from tunekit.cli.errors import UsageError
from tunekit.config import load, validate
from tunekit.config.catalog import find_config, find_recipe
from tunekit.config.loading import split_config_arg

_USAGE = "tunekit run [torchrun options] <recipe|recipe.py> --config <name|path.yaml> [overrides ...]"


def add_parser(subparsers) -> None:
    # prefix_chars="+" keeps argparse from reading torchrun's --options: everything after `run`
    # lands in `argv` untouched and split_run_args() sorts it out.
    p = subparsers.add_parser("run", help="run a recipe (in-process, or with torchrun options)",
                              usage=_USAGE, description=__doc__, prefix_chars="+", add_help=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=run, print_help=p.print_help)


def _torchrun_flags() -> set[str]:
    """torchrun options that take no value (``--standalone``), from torchrun's own parser."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    return {o for a in parser._actions if a.nargs == 0 for o in a.option_strings}


def split_run_args(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """``[*torchrun_opts, recipe, *recipe_args]`` -> ``(torchrun_opts, recipe, recipe_args)``."""
    opts: list[str] = []
    i = 0
    flags = _torchrun_flags() if argv and argv[0].startswith("-") else set()
    while i < len(argv) and argv[i].startswith("-"):
        opt = argv[i]
        takes_value = "=" not in opt and opt not in flags
        if takes_value and i + 1 >= len(argv):
            raise UsageError(f"torchrun option {opt} needs a value; usage: {_USAGE}")
        opts += argv[i:i + 2] if takes_value else [opt]
        i += 2 if takes_value else 1
    if i >= len(argv):
        raise UsageError(f"missing recipe; usage: {_USAGE}")
    return opts, argv[i], argv[i + 1:]


def _run_in_process(recipe: Path, recipe_argv: list[str]) -> int:
    old_argv, old_path = sys.argv, list(sys.path)
    # As `python recipe.py` would: the recipe's folder is importable (forked recipes may import
    # a sibling file).
    sys.argv = [str(recipe), *recipe_argv]
    sys.path.insert(0, str(recipe.parent))
    try:
        runpy.run_path(str(recipe), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return 0


def run(args: argparse.Namespace) -> int:
    if args.argv in (["-h"], ["--help"]) or not args.argv:
        args.print_help()
        return 0 if args.argv else 2
    torchrun_opts, recipe_name, rest = split_run_args(args.argv)
    recipe = find_recipe(recipe_name)
    if torchrun_opts and not recipe.name.endswith("_distributed.py"):
        distributed = recipe.stem.replace("_single_device", "") + "_distributed"
        raise UsageError(f"recipe {recipe.stem} runs on one device; use {distributed} for "
                         f"{' '.join(torchrun_opts)}")
    config, overrides = split_config_arg(rest)
    config_path = find_config(config)
    validate(load(config_path, overrides), source=config)
    recipe_argv = ["--config", str(config_path), *overrides]
    if not torchrun_opts:
        return _run_in_process(recipe, recipe_argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_opts, str(recipe), *recipe_argv]
    return subprocess.run(cmd).returncode
