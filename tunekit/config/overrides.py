"""Command-line overrides: ``a.b=value``, ``~a.b`` (delete), ``+a.b=value`` (add a new key).

Values are parsed as YAML (``lr=1e-4`` is a float, ``dims=[1,2]`` a list, ``x=${y}`` an
interpolation). Setting a key that is not in the config is refused (with the closest existing key),
because a typo would otherwise be silently ignored; two exceptions:

- under a ``_component_`` node any argument name may be added (``validate`` checks it against the
  callable's signature), e.g. ``optimizer.weight_decay=0.1``;
- ``+a.b=value`` adds a key anywhere.

Shortcut: ``optimizer=torch.optim.SGD`` on a ``_component_`` node swaps the component and keeps
its other arguments (delete the ones the new component lacks with ``~optimizer.betas``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunekit.config.errors import ConfigError, did_you_mean

_KEY = re.compile(r"[A-Za-z_][\w\-]*(\.[\w\-]+)*")
_DOTTED_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_ABSENT = object()
_SYNTAX_HELP = "use key=value, ~key to delete, or +key=value to add a key"


def parse_value(text: str):
    """Parse an override value the way a YAML file would (``1e-4`` -> float, ``${a}`` stays)."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]), resolve=False)["value"]


def _lookup(cfg: DictConfig, key: str):
    """The node or value at ``key`` (no interpolation resolved), or ``_ABSENT``."""
    node = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node.keys():  # `in node` is False for ???
            node = node._get_node(part)
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return _ABSENT
    return node


def _keys_of(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key in ``cfg`` (for did-you-mean)."""
    keys = []
    for k, v in cfg.items_ex(resolve=False):
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys += _keys_of(v, full + ".")
    return keys


def _no_such_key(cfg: DictConfig, key: str, override: str, hint: str = "") -> ConfigError:
    return ConfigError(f"override {override}: no key {key!r} in the config{did_you_mean(key, _keys_of(cfg))}"
                       + hint)


def _apply_one(cfg: DictConfig, text: str) -> None:
    add = text.startswith("+")
    delete = text.startswith("~")
    body = text[1:] if add or delete else text
    key, eq, raw = body.partition("=")
    if not _KEY.fullmatch(key) or (delete and eq) or (not delete and not eq):
        raise ConfigError(f"bad override {text!r}: {_SYNTAX_HELP}")
    parent_key, _, leaf = key.rpartition(".")
    parent = _lookup(cfg, parent_key) if parent_key else cfg
    current = _lookup(cfg, key)

    if delete:
        if current is _ABSENT:
            raise _no_such_key(cfg, key, text)
        if isinstance(parent, ListConfig):
            del parent[int(leaf)]
        else:
            parent.pop(leaf)
        return

    value = parse_value(raw)
    if (isinstance(current, DictConfig) and "_component_" in current and isinstance(value, str)
            and _DOTTED_PATH.fullmatch(value)):
        current["_component_"] = value
        return
    if current is _ABSENT and not add:
        is_argument = isinstance(parent, DictConfig) and "_component_" in parent
        if not is_argument:
            raise _no_such_key(cfg, key, text, f" (to add a new key: +{key}=...)")
    OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def apply_overrides(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    """Apply command-line overrides to ``cfg`` in place (and return it); see the module docstring.

    Raises ``ConfigError`` on bad syntax or unknown keys (with the closest existing key).
    """
    for text in overrides:
        _apply_one(cfg, text)
    return cfg
