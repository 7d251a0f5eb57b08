"""Configs: YAML + command-line overrides, ``_component_`` instantiation and validation.

    cfg = tunekit.config.load("tiny/lora", ["optimizer.lr=1e-4"])
    tunekit.config.validate(cfg)
    optimizer = tunekit.config.instantiate(cfg.optimizer, model.parameters())
"""

from tunekit.config.errors import ConfigError, MissingFileError, UserError, user_errors
from tunekit.config.instantiate import config_kwargs, instantiate
from tunekit.config.loading import load, parse
from tunekit.config.overrides import apply_overrides
from tunekit.config.resolvers import register_resolvers
from tunekit.config.validate import validate

register_resolvers()  # ${asset:...} works in configs created directly with OmegaConf too

__all__ = ["ConfigError", "MissingFileError", "UserError", "apply_overrides", "instantiate", "load", "parse", "config_kwargs", "user_errors", "validate"]
