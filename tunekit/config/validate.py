"""Check a config before anything runs: every problem found at once, each with its fix.

Checked: interpolations resolve; every ``_component_`` imports; every argument in a component node
is a parameter of the callable (unless it takes ``**kwargs``); no required parameter is left out.
Required parameters a recipe passes itself are not reported:

- the first parameter, when it has no default (``params`` of an optimizer, ``tokenizer`` of a
  dataset builder, ``optimizer`` of an lr scheduler): recipes inject it positionally;
- parameters written as ``???`` in the YAML (e.g. ``num_training_steps: ???``): the recipe passes
  them as keyword arguments to ``instantiate``.

A ``???`` outside a component node is a value the user must set; it is reported.

A callable taking ``**kwargs`` accepts only the names it declares with :func:`config_kwargs`
(tunekit's own builders must declare them, so a misspelled argument cannot vanish into
``**kwargs``); other libraries' callables with ``**kwargs`` accept any name. Arguments annotated
as plain ``int`` / ``float`` / ``bool`` / ``str`` (or optional ones) must hold a value of that type.

With a ``schema`` (the keys a recipe reads, ``tunekit.config.schema``) every key outside the
component nodes is checked too: unknown keys, missing keys, types and ranges.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunekit.config.errors import ConfigError, did_you_mean
from tunekit.config.instantiate import declared_kwargs, import_component
from tunekit.config.schema import Spec, check_schema

_COMPONENT = "_component_"
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


_SIMPLE = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _simple_types(annotation: Any) -> tuple[tuple[type, ...], bool] | None:
    """(accepted Python types, None allowed) for ``int``/``float``/``bool``/``str`` annotations and
    their optional forms; None when the annotation is anything else (then nothing is checked)."""
    if annotation in _SIMPLE:
        return _SIMPLE[annotation], False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        # a config cannot hold a tensor: `lr: float | Tensor` takes a float from it
        rest = [a for a in args if a is not type(None) and getattr(a, "__name__", "") != "Tensor"]
        if len(rest) == 1 and rest[0] in _SIMPLE:
            return _SIMPLE[rest[0]], len(rest) < len(args)
    return None


def _type_problem(fn: Any, name: str, value: Any) -> str | None:
    try:
        hints = typing.get_type_hints(fn.__init__ if inspect.isclass(fn) else fn)
    except Exception:  # unresolvable annotations (forward references of other libraries): skip
        return None
    simple = _simple_types(hints.get(name))
    if simple is None or isinstance(value, (DictConfig, ListConfig)):
        return None
    allowed, nullable = simple
    if value is None:
        return None if nullable else f"must not be null ({allowed[-1].__name__})"
    if isinstance(value, bool) and bool not in allowed:
        return f"expected {allowed[-1].__name__}, got {value!r}"
    if not isinstance(value, allowed):
        return f"expected {allowed[-1].__name__}, got {value!r}"
    return None


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
    extra = declared_kwargs(fn) if takes_kwargs else frozenset()
    given = [k for k in node if k != _COMPONENT]
    for k in given:
        if k not in named and (extra is not None and k not in extra):
            problems.append(f"{key}.{k}: no such argument of {target}"
                            f"{did_you_mean(str(k), [*named, *(extra or ())])}")
        elif k in named and not OmegaConf.is_missing(node, k):
            try:
                value = node[k]
            except Exception:  # unresolvable interpolation: reported by _walk
                continue
            problem = _type_problem(fn, str(k), value)
            if problem:
                problems.append(f"{key}.{k}: {problem} (argument of {target})")
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


def config_problems(cfg: DictConfig, schema: Mapping[str, Spec] | None = None) -> list[str]:
    """Every problem in ``cfg`` (see the module docstring), one line each, without duplicates."""
    problems: list[str] = []
    _walk(cfg, "", problems)
    if schema is not None:
        problems.extend(check_schema(cfg, schema))
    return list(dict.fromkeys(problems))


def validate(cfg: DictConfig, *, schema: Mapping[str, Spec] | None = None, source: str | None = None,
             schemas: Iterable[tuple[str, Mapping[str, Spec]]] = ()) -> None:
    """Raise one ``ConfigError`` listing every problem in ``cfg`` (see the module docstring).

    ``schema``: the keys of the recipe that will read ``cfg``; ``schemas``: ``(recipe name,
    schema)`` pairs of several recipes sharing the config (a problem for only some of them says
    which). ``source`` (the config's file or name) prefixes the message.
    """
    problems = config_problems(cfg, schema)
    named = list(schemas)
    per_recipe = {name: check_schema(cfg, s) for name, s in named}
    for name, found in per_recipe.items():
        for p in found:
            shared = all(p in other for other in per_recipe.values())
            problems.append(p if shared else f"{p} (for {name})")
    problems = list(dict.fromkeys(problems))
    if problems:
        raise ConfigError(problems, source=source)
