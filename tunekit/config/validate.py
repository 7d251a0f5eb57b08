"""Check a config before anything runs: every problem found at once, each with its fix.

Checked: interpolations resolve; every ``_component_`` imports; every argument in a component node
is a parameter of the callable (unless it takes ``**kwargs``); no required parameter is left out.
Required parameters a recipe passes itself are not reported:

- the first parameter, when it has no default (``params`` of an optimizer, ``tokenizer`` of a
  dataset builder, ``optimizer`` of an lr scheduler): recipes inject it positionally;
- parameters written as ``???`` in the YAML (e.g. ``num_training_steps: ???``): the recipe passes
  them as keyword arguments to ``instantiate``.

A ``???`` outside a component node is a value the user must set; it is reported.
"""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunekit.config.errors import ConfigError, did_you_mean
from tunekit.config.instantiate import import_component

_COMPONENT = "_component_"
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _check_component(node: DictConfig, key: str, problems: list[str]) -> None:
    component_key = f"{key}.{_COMPONENT}" if key else _COMPONENT
    try:
        target = node[_COMPONENT]
        fn = import_component(target, component_key)
    except ConfigError as e:
        problems.extend(e.problems)
        return
    except Exception as e:  # an interpolation that does not resolve
        problems.append(f"{component_key}: {_first_line(e)}")
        return
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no introspectable signature: nothing more to check
        return
    named = {n: p for n, p in params.items() if p.kind in _NAMED}
    takes_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = [k for k in node if k != _COMPONENT]
    for k in given:
        if k not in named and not takes_kwargs:
            problems.append(f"{key}.{k}: no such argument of {target}{did_you_mean(str(k), named)}")
    first = next(iter(params.values()), None)
    injected = (first.name if first is not None and first.default is inspect.Parameter.empty
                and first.kind != inspect.Parameter.KEYWORD_ONLY else None)
    for name, p in named.items():
        if p.default is inspect.Parameter.empty and name not in given and name != injected:
            problems.append(f"{key}.{name}: required argument of {target} is missing; "
                            f"add it to the config or pass {key}.{name}=...")


def _walk(node: Any, key: str, problems: list[str]) -> None:
    if isinstance(node, DictConfig):
        is_component = _COMPONENT in node
        if is_component:
            _check_component(node, key, problems)
        items = [(k, f"{key}.{k}" if key else str(k)) for k in node]
        get = node.__getitem__
    elif isinstance(node, ListConfig):
        is_component = False
        items = [(i, f"{key}.{i}") for i in range(len(node))]
        get = node.__getitem__
    else:
        return
    for k, full in items:
        if k == _COMPONENT:
            continue
        if OmegaConf.is_missing(node, k):
            if not is_component:
                problems.append(f"{full}: value is missing (???); set it on the command line: {full}=...")
            continue
        try:
            value = get(k)  # resolves interpolations
        except Exception as e:
            problems.append(f"{full}: {_first_line(e)}")
            continue
        _walk(value, full, problems)


def validate(cfg: DictConfig, *, source: str | None = None) -> None:
    """Raise one ``ConfigError`` listing every problem in ``cfg`` (see the module docstring).

    ``source`` (the config's file or name) prefixes the message.
    """
    problems: list[str] = []
    _walk(cfg, "", problems)
    if problems:
        raise ConfigError(problems, source=source)
