"""tunekit run [torchrun options] <recipe> --config <name|path> [overrides]

Without torchrun options the recipe runs in this process, as `python <recipe> --config ...`
would. With them (every option before the recipe, e.g. `--nproc_per_node 2 --standalone`) it is
handed to `python -m torch.distributed.run` (this process execs it); only `*_distributed.py`
recipes accept them.
The config is loaded and validated first against the keys the recipe reads (its ``CONFIG``), so
a typo fails in a second, not after the launch.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

from tunekit.cli.errors import UsageError
from tunekit.config import load, validate
from tunekit.config.catalog import builtin_recipes, find_config, find_recipe, recipe_schema
from tunekit.config.errors import did_you_mean
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


def _torchrun_options() -> tuple[set[str], set[str]]:
    """(all torchrun options, those taking no value like ``--standalone``), from torchrun's parser."""
    from torch.distributed.run import get_args_parser

    actions = get_args_parser()._actions
    return ({o for a in actions for o in a.option_strings},
            {o for a in actions if a.nargs == 0 for o in a.option_strings})


def split_run_args(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """``[*torchrun_opts, recipe, *recipe_args]`` -> ``(torchrun_opts, recipe, recipe_args)``."""
    opts: list[str] = []
    i = 0
    known, flags = _torchrun_options() if argv and argv[0].startswith("-") else (set(), set())
    while i < len(argv) and argv[i].startswith("-"):
        opt = argv[i]
        if opt.split("=", 1)[0] not in known:
            raise UsageError(f"unknown torchrun option {opt}{did_you_mean(opt, known)} "
                             f"(see `python -m torch.distributed.run --help`); usage: {_USAGE}")
        takes_value = "=" not in opt and opt not in flags
        if takes_value and i + 1 >= len(argv):
            raise UsageError(f"torchrun option {opt} needs a value; usage: {_USAGE}")
        opts += argv[i:i + 2] if takes_value else [opt]
        i += 2 if takes_value else 1
    if i >= len(argv):
        raise UsageError(f"missing recipe; usage: {_USAGE}")
    return opts, argv[i], argv[i + 1:]


def _distributed_twin(recipe: Path) -> str:
    """full_finetune_single_device -> full_finetune_distributed, when that recipe exists."""
    twin = recipe.stem.removesuffix("_single_device") + "_distributed"
    if twin in builtin_recipes() or (recipe.parent / f"{twin}.py").is_file():
        return twin
    return "a *_distributed recipe"


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
        raise UsageError(f"recipe {recipe.stem} runs on one device; use {_distributed_twin(recipe)} "
                         f"for {' '.join(torchrun_opts)}")
    config, overrides = split_config_arg(rest)
    config_path = find_config(config)
    validate(load(config_path, overrides), schema=recipe_schema(recipe), source=config)
    recipe_argv = ["--config", str(config_path), *overrides]
    if not torchrun_opts:
        return _run_in_process(recipe, recipe_argv)
    # torchrun itself, in tunekit.cli.launch: failed ranks end in one error line, not a traceback
    cmd = [sys.executable, "-m", "tunekit.cli.launch", *torchrun_opts, str(recipe), *recipe_argv]
    # This process becomes torchrun: a signal sent to the process the user started (Ctrl-C, a
    # scheduler's or `kill`'s SIGTERM) reaches torchrun's agent itself, which hands it on to the
    # ranks and gives them 30 s to finish the step and save. A torchrun child would be orphaned,
    # ranks and all, by a SIGTERM that only its parent received.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
