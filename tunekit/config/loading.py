"""Reading a config: a built-in name or a .yaml path, plus command-line overrides."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from tunekit.config.catalog import find_config
from tunekit.config.errors import ConfigError, exit_on_user_error
from tunekit.config.overrides import apply_overrides
from tunekit.config.resolvers import register_resolvers
from tunekit.config.schema import Spec
from tunekit.config.validate import validate

_USAGE = "usage: <recipe> --config <name|path.yaml> [key=value | ~key | +key=value ...]"


def load(path_or_name: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a built-in config (``tiny/lora``) or a ``.yaml`` file and apply ``overrides``.

    Interpolations stay lazy (resolved on access). Raises ``ConfigError`` naming the file.
    """
    register_resolvers()
    path = find_config(path_or_name)
    try:
        cfg = OmegaConf.load(path)
    except (yaml.YAMLError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"invalid YAML: {first}", source=str(path)) from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError("the top level must be a mapping of keys to values", source=str(path))
    try:
        return apply_overrides(cfg, overrides)
    except ConfigError as e:
        raise ConfigError(e.problems, source=str(path)) from None


def split_config_arg(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``["--config", X, *overrides]`` (``--config=X`` too, anywhere) -> ``(X, overrides)``."""
    config, overrides = None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config":
            if not args:
                raise ConfigError(f"--config needs a value; {_USAGE}")
            config = args.pop(0)
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; {_USAGE}")
        else:
            overrides.append(arg)
    if not config:
        raise ConfigError(f"missing --config; {_USAGE}")
    return config, overrides


def parse(argv: Sequence[str], schema: Mapping[str, Spec] | None = None) -> DictConfig:
    """A recipe's command line -> validated config (against the recipe's ``schema``, the keys it
    reads: ``tunekit.config.schema``). Like ``argparse.parse_args``, a mistake prints
    ``tunekit: error: ...`` and exits with code 2 (``TUNEKIT_DEBUG=1`` shows the traceback).

    Recipes end with ``main(tunekit.config.parse(sys.argv[1:], CONFIG))``.
    """
    with exit_on_user_error(ConfigError):
        config, overrides = split_config_arg(argv)
        cfg = load(config, overrides)
        validate(cfg, schema=schema, source=config)
        return cfg
