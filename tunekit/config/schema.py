"""What a recipe reads from its config: every key with its type and allowed values.

A recipe declares its keys at the top of its file::

    CONFIG = {
        "output_dir": Str(),
        "batch_size": Int(min=1),
        "dtype": Str(choices=("fp32", "bf16")),
        "max_steps": Int(min=1, nullable=True),
        "lora": Section({"rank": Int(min=1), "targets": List(Str())}),
        "optimizer": Component(),
    }

and ``check_schema(cfg, CONFIG, recipe=...)`` lists every problem at once: a key the recipe does
not read (it would be ignored silently: a typo, or a setting of another recipe), a key it reads
that the config lacks, and a value of the wrong type or outside its range, each with the closest
valid key. ``tunekit validate``, ``tunekit run`` and ``tunekit.config.parse`` apply it before
anything runs; the arguments inside ``_component_`` nodes are checked against the callable's
signature by ``tunekit.config.validate``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tunekit.config.errors import did_you_mean

_COMPONENT = "_component_"


@dataclass(frozen=True)
class Spec:
    """One config value. ``nullable``: ``null`` is allowed; ``check(value)`` may return a problem
    (a sentence without the key) for what the type alone cannot say."""

    # keyword-only, so that subclasses take their own field first: Section({...}), List(Str())
    nullable: bool = field(default=False, kw_only=True)
    check: Callable[[Any], str | None] | None = field(default=None, kw_only=True)

    def describe(self) -> str:
        raise NotImplementedError

    def _type_ok(self, value: Any) -> bool:
        raise NotImplementedError

    def problems(self, value: Any, key: str) -> list[str]:
        if value is None:
            return [] if self.nullable else [f"{key}: must not be null; expected {self.describe()}"]
        if not self._type_ok(value):
            return [f"{key}: expected {self.describe()}{' or null' if self.nullable else ''}, got {_show(value)}"]
        problem = self.check(value) if self.check is not None else None
        return [f"{key}: {problem} (got {_show(value)})"] if problem else []


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Int(Spec):
    min: int | None = None
    max: int | None = None

    def describe(self) -> str:
        if self.min == 1 and self.max is None:
            return "a positive integer"
        if self.min == 0 and self.max is None:
            return "an integer >= 0"
        bounds = [f">= {self.min}" if self.min is not None else "", f"<= {self.max}" if self.max is not None else ""]
        return "an integer " + " and ".join(b for b in bounds if b) if any(bounds) else "an integer"

    def _type_ok(self, value: Any) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool)
                and (self.min is None or value >= self.min) and (self.max is None or value <= self.max))


@dataclass(frozen=True)
class Float(Spec):
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False

    def describe(self) -> str:
        bounds = []
        if self.min is not None:
            bounds.append(f"{'>' if self.min_exclusive else '>='} {self.min:g}")
        if self.max is not None:
            bounds.append(f"<= {self.max:g}")
        return "a number" + (" " + " and ".join(bounds) if bounds else "")

    def _type_ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.min is not None and (value <= self.min if self.min_exclusive else value < self.min):
            return False
        return self.max is None or value <= self.max


@dataclass(frozen=True)
class Bool(Spec):
    def describe(self) -> str:
        return "true or false"

    def _type_ok(self, value: Any) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Str(Spec):
    choices: tuple[str, ...] | None = None

    def describe(self) -> str:
        return "one of " + " | ".join(self.choices) if self.choices else "a string"

    def _type_ok(self, value: Any) -> bool:
        return isinstance(value, str) and (self.choices is None or value in self.choices)

    def problems(self, value: Any, key: str) -> list[str]:
        found = super().problems(value, key)
        if found and self.choices and isinstance(value, str):
            found = [found[0] + did_you_mean(value, self.choices)]
        return found


@dataclass(frozen=True)
class List(Spec):
    """A list of ``item`` values; ``single_ok``: one bare value stands for a list of one
    (``loss_type: sigmoid`` or ``loss_type: [sigmoid, sft]``)."""

    item: Spec = field(default_factory=Str)
    min_len: int = 1
    single_ok: bool = False

    def describe(self) -> str:
        what = self.item.describe()
        listed = f"a list of {what.removeprefix('a ').removeprefix('an ')}s" + (
            f" (at least {self.min_len})" if self.min_len > 1 else " (not empty)" if self.min_len == 1 else "")
        return f"{what} or {listed}" if self.single_ok else listed

    def _type_ok(self, value: Any) -> bool:
        if self.single_ok and not isinstance(value, (list, tuple, ListConfig)):
            return True  # the item's own check decides
        return isinstance(value, (list, tuple, ListConfig)) and len(value) >= self.min_len

    def problems(self, value: Any, key: str) -> list[str]:
        found = super().problems(value, key)
        if found or value is None:
            return found
        if self.single_ok and not isinstance(value, (list, tuple, ListConfig)):
            return self.item.problems(value, key)
        return [p for i, v in enumerate(value) for p in self.item.problems(v, f"{key}.{i}")]


@dataclass(frozen=True)
class Component(Spec):
    """A ``_component_`` node (its arguments are checked against the callable by ``validate``)."""

    def describe(self) -> str:
        return f"a mapping with {_COMPONENT}"

    def _type_ok(self, value: Any) -> bool:
        return isinstance(value, (DictConfig, Mapping)) and _COMPONENT in value


@dataclass(frozen=True)
class Components(Spec):
    """Several ``_component_`` nodes: a mapping of names to them, where a null or false entry is
    off (``metric_logging.tensorboard=false`` on the command line), or a plain list of them. Each
    node's arguments are checked against its callable by ``validate``."""

    def describe(self) -> str:
        return f"a mapping of names to mappings with {_COMPONENT} (null or false: off), or a list of them"

    def _type_ok(self, value: Any) -> bool:
        return isinstance(value, (list, tuple, ListConfig)) or (
            isinstance(value, (DictConfig, Mapping)) and _COMPONENT not in value)

    def problems(self, value: Any, key: str) -> list[str]:
        found = super().problems(value, key)
        if found or value is None:
            return found
        named = not isinstance(value, (list, tuple, ListConfig))
        for k in (value.keys() if named else range(len(value))):
            item, problem = _get(value, k)
            if problem is not None:
                if "???" not in problem:
                    found.append(f"{key}.{k}: {problem}")
            elif not Component()._type_ok(item) and not (named and (item is None or item is False)):
                off = " (or null / false to switch it off)" if named else ""
                found.append(f"{key}.{k}: expected a mapping with {_COMPONENT}{off}, got {_show(item)}")
        return found


@dataclass(frozen=True)
class Section(Spec):
    """A plain mapping of keys (no ``_component_``), each with its own spec. ``note`` says who
    reads the section when it is not obvious (shown in problems about it)."""

    keys: Mapping[str, Spec] = field(default_factory=dict)
    note: str = ""

    def describe(self) -> str:
        return "a mapping of " + ", ".join(self.keys)

    def _type_ok(self, value: Any) -> bool:
        return isinstance(value, (DictConfig, Mapping)) and _COMPONENT not in value

    def problems(self, value: Any, key: str) -> list[str]:
        if value is None or not self._type_ok(value):
            return Spec.problems(self, value, key)
        found = _mapping_problems(value, self.keys, key)
        if not found and self.check is not None:  # the section as a whole, once each key is fine
            problem = self.check(value)
            found = [f"{key}: {problem}"] if problem else []
        return found


def _get(node: Any, k: Any) -> tuple[Any, str | None]:
    """The value of ``node[k]`` with interpolations resolved, or a problem."""
    if isinstance(node, DictConfig) and OmegaConf.is_missing(node, k):
        return None, "value is missing (???); set it on the command line: {key}=..."
    try:
        return node[k], None
    except Exception as e:  # an interpolation that does not resolve: omegaconf's message says which
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, first


def _mapping_problems(node: Any, keys: Mapping[str, Spec], prefix: str) -> list[str]:
    problems = []
    dotted = (lambda k: f"{prefix}.{k}") if prefix else str
    for k in node:
        if k not in keys:
            hint = did_you_mean(str(k), keys).replace("did you mean ", f"did you mean {dotted('')}")
            problems.append(f"{dotted(k)}: not a key this recipe reads (it would be ignored)"
                            + (hint or "; remove it"))
    present = set(node.keys())  # `k in node` is False for a ??? value in omegaconf
    for k, spec in keys.items():
        if k not in present:
            problems.append(f"{dotted(k)}: missing; the recipe reads it: add it to the config "
                            f"({spec.describe()}{', or null' if spec.nullable else ''})")
            continue
        value, problem = _get(node, k)
        if problem is not None:
            if "???" not in problem:  # missing values are reported by validate()
                problems.append(f"{dotted(k)}: {problem}")
            continue
        problems.extend(spec.problems(value, dotted(k)))
    return problems


def check_schema(cfg: DictConfig, schema: Mapping[str, Spec]) -> list[str]:
    """Every problem of ``cfg`` against ``schema`` (one line each; empty when it fits)."""
    return _mapping_problems(cfg, schema, "")


def keys_of(schema: Mapping[str, Spec]) -> Sequence[str]:
    """The dotted names of every key in ``schema`` (sections expanded), in order."""
    names = []
    for k, spec in schema.items():
        names.append(k)
        if isinstance(spec, Section):
            names.extend(f"{k}.{sub}" for sub in keys_of(spec.keys))
    return names
