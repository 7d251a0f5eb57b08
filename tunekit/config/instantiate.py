"""Build objects from ``_component_`` nodes.

``{_component_: torch.optim.AdamW, lr: 1e-4}`` calls ``torch.optim.AdamW(lr=1e-4)``. Nested
``_component_`` nodes (also inside lists) are built first and passed as arguments; other dicts and
lists are passed as plain Python containers. A recipe adds what only it knows:
``instantiate(cfg.optimizer, model.parameters())``, ``instantiate(cfg.lr_scheduler, optimizer,
num_training_steps=n)``. An argument written as ``???`` in the YAML is one the recipe passes.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunekit.config.errors import ConfigError, did_you_mean

_COMPONENT = "_component_"


def config_kwargs(*names: str) -> Callable[[Callable], Callable]:
    """Declare the keyword names a callable's ``**kwargs`` accepts from a config::

        @config_kwargs("name", "data_dir", "data_files", "revision")
        def chat_dataset(tokenizer, source, *, ..., **hf_kwargs): ...

    ``validate`` then reports any other name as a typo instead of passing it through."""
    def mark(fn: Callable) -> Callable:
        fn.__config_kwargs__ = frozenset(names)
        return fn
    return mark


def config_nodes(*names: str) -> Callable[[Callable], Callable]:
    """Declare arguments a callable receives as their config nodes, not built: it instantiates
    the ``_component_`` nodes inside them itself, with arguments only it has::

        @config_nodes("datasets")
        def mix_datasets(tokenizer, datasets, ...):  # instantiate(entry.dataset, tokenizer)
    """
    def mark(fn: Callable) -> Callable:
        fn.__config_nodes__ = frozenset(names)
        return fn
    return mark


def declared_kwargs(fn: Any) -> frozenset[str] | None:
    """The names declared with :func:`config_kwargs`, or None."""
    return getattr(fn, "__config_kwargs__", None)


def _public_names(module) -> list[str]:
    names = [n for n in dir(module) if not n.startswith("_")]
    if hasattr(module, "__path__"):  # a package: its submodules count too
        names += [m.name for m in pkgutil.iter_modules(module.__path__) if not m.name.startswith("_")]
    return names


def _suggest_import(parts: list[str], depth: int, module) -> str:
    """Closest existing dotted path when ``parts[depth]`` is not an attribute of ``module``."""
    import difflib

    missing = parts[depth]
    candidates = {n: n for n in _public_names(module)}
    # One level down: tunekit.models.llama3_2_1bb -> tunekit.models.llama3_2.llama3_2_1b.
    if hasattr(module, "__path__"):
        for sub in pkgutil.iter_modules(module.__path__):
            if sub.name.startswith("_"):
                continue
            try:
                submodule = importlib.import_module(f"{module.__name__}.{sub.name}")
            except Exception:
                continue
            for n in dir(submodule):
                if not n.startswith("_"):
                    candidates.setdefault(n, f"{sub.name}.{n}")
    match = difflib.get_close_matches(missing, list(candidates), n=1, cutoff=0.6)
    if not match:
        return ""
    return "; did you mean " + ".".join(parts[:depth] + [candidates[match[0]]] + parts[depth + 1:]) + "?"


def import_component(path: str, key: str = _COMPONENT) -> Any:
    """Import ``pkg.mod.attr`` (attributes may be nested: ``pkg.mod.Class.method``).

    Raises ``ConfigError`` naming ``key`` and the closest importable name when it fails.
    """
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{key}: expected a dotted import path like torch.optim.AdamW, got {path!r}")
    parts = path.split(".")
    module, depth = None, 0
    for i in range(len(parts), 0, -1):  # longest importable module prefix
        name = ".".join(parts[:i])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and not name.startswith(e.name):
                raise ConfigError(f"{key}: importing {name} failed: {e} (install the missing package)") from e
            continue
        except Exception as e:
            raise ConfigError(f"{key}: importing {name} failed: {type(e).__name__}: {e}") from e
        depth = i
        break
    if module is None:
        raise ConfigError(f"{key}: cannot import {path}: no module named {parts[0]!r}")
    if depth == len(parts) and depth > 1:
        # `pkg.fn` where pkg/fn.py defines fn and pkg/__init__.py re-exports it: the package
        # attribute (the function) is what a config means, not the submodule of the same name.
        attr = getattr(importlib.import_module(".".join(parts[:-1])), parts[-1], None)
        if attr is not None and not inspect.ismodule(attr):
            return attr
    obj = module
    for i in range(depth, len(parts)):
        if not hasattr(obj, parts[i]):
            hint = _suggest_import(parts, i, obj) if inspect.ismodule(obj) else ""
            raise ConfigError(f"{key}: cannot import {path}{hint}")
        obj = getattr(obj, parts[i])
    return obj


def _is_component(node: Any) -> bool:
    return isinstance(node, DictConfig) and _COMPONENT in node


def _full_key(node: Any) -> str:
    try:
        return node._get_full_key(None) or "config"
    except Exception:
        return "config"


def _build(node: Any, key: str) -> Any:
    """Recursively turn config nodes into Python objects, building nested components."""
    if _is_component(node):
        return _call(node, key, (), {})
    if isinstance(node, DictConfig):
        return {k: _build(node[k], f"{key}.{k}") for k in node}
    if isinstance(node, ListConfig):
        return [_build(v, f"{key}.{i}") for i, v in enumerate(node)]
    return node


def _call(node: DictConfig, key: str, args: tuple, kwargs: dict) -> Any:
    fn = import_component(node[_COMPONENT], f"{key}.{_COMPONENT}")
    unbuilt = getattr(fn, "__config_nodes__", frozenset())
    built = {}
    for k in node:
        if k == _COMPONENT or k in kwargs:
            continue
        if OmegaConf.is_missing(node, k):
            raise ConfigError(f"{key}.{k} is ??? (to be passed by the recipe) but nothing passed it; "
                              f"set it in the config or on the command line: {key}.{k}=...")
        built[k] = node[k] if k in unbuilt else _build(node[k], f"{key}.{k}")
    built.update(kwargs)
    _check_declared_kwargs(fn, node[_COMPONENT], key, built)
    try:
        inspect.signature(fn).bind(*args, **built)
    except TypeError as e:
        raise ConfigError(f"{key}: cannot call {node[_COMPONENT]} with these arguments: {e}") from None
    except ValueError:  # no signature available (some builtins): let the call itself decide
        pass
    return fn(*args, **built)


def _check_declared_kwargs(fn: Any, target: str, key: str, given: dict) -> None:
    """Names that would land in a ``**kwargs`` that declares what it accepts, but are not declared."""
    extra = declared_kwargs(fn)
    if extra is None:
        return
    try:
        named = {n for n, p in inspect.signature(fn).parameters.items()
                 if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    except (TypeError, ValueError):
        return
    for name in given:
        if name not in named and name not in extra:
            raise ConfigError(f"{key}.{name}: no such argument of {target}{did_you_mean(name, [*named, *extra])}")


def instantiate(node: DictConfig | dict | None, *args: Any, **kwargs: Any) -> Any:
    """Build the object a ``_component_`` node describes.

    ``args`` are passed first (positionally), ``kwargs`` override the node's own arguments.
    ``None`` gives ``None`` (an optional component switched off with ``key=null``).
    """
    if node is None:
        return None
    if isinstance(node, dict):
        node = OmegaConf.create(node)
    if not _is_component(node):
        raise ConfigError(f"{_full_key(node)}: cannot instantiate a node without {_COMPONENT}")
    return _call(node, _full_key(node), args, kwargs)
