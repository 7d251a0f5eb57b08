"""Weighted mixing of several datasets into one map-style dataset with a fixed, seeded plan.

    dataset:
      _component_: tunekit.data.mix_datasets
      seed: 0
      num_examples: null          # examples per epoch; null: the sum of the datasets' sizes
      datasets:
        - weight: 0.7
          dataset: {_component_: tunekit.data.chat_dataset, source: chat.jsonl, max_seq_len: 2048}
        - weight: 0.3
          dataset: {_component_: tunekit.data.instruct_dataset, source: alpaca.jsonl, max_seq_len: 2048}

Each entry's ``dataset`` is any dataset component of the recipe (built here with the recipe's
tokenizer). The epoch has ``num_examples`` examples; dataset ``k`` contributes
``round(num_examples * w_k / sum(w))`` of them (largest remainders, so the counts add up), drawn
from a seeded permutation of its items, repeated when it contributes more than it holds
(upsampling) and cut when fewer (downsampling). The plan, a list of (dataset, item) pairs, is
shuffled with the seed and fixed at construction; the recipe's ``ResumableSampler`` then orders
the epochs over it as over any map-style dataset, so runs are deterministic and resume exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tunekit.config.errors import UserError
from tunekit.config.instantiate import config_nodes, instantiate

logger = logging.getLogger(__name__)


def mixture_counts(weights: Sequence[float], total: int) -> np.ndarray:
    """How many of ``total`` examples each weight gets: ``total * w / sum(w)`` rounded by largest
    remainder (ties to the earlier dataset), so the counts sum to ``total``."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


class MixedDataset(torch.utils.data.Dataset):
    """``dataset[j] = parts[k][i]`` for the j-th (k, i) of the plan; ``collate`` is the parts'
    (which must batch alike: the same dataset class, and the same packed row length)."""

    def __init__(self, parts: Sequence[torch.utils.data.Dataset], weights: Sequence[float], *,
                 num_examples: int | None = None, seed: int = 0):
        if not parts:
            raise UserError("mix_datasets: datasets is empty; give at least one {weight, dataset} entry")
        if any(not isinstance(w, (int, float)) or w <= 0 for w in weights):
            raise UserError(f"mix_datasets: every weight must be a number > 0, got {list(weights)}")
        kinds = {_batch_kind(p) for p in parts}
        if len(kinds) > 1:
            raise UserError("mix_datasets: the datasets must batch alike (the same builder kind, all packed to the "
                            f"same max_seq_len or all unpacked); got {', '.join(sorted(map(str, kinds)))}")
        self.parts, self.weights, self.seed = list(parts), [float(w) for w in weights], seed
        total = sum(len(p) for p in parts) if num_examples is None else num_examples
        if total < 1:
            raise UserError(f"mix_datasets: num_examples must be >= 1, got {total}")
        self.counts = mixture_counts(self.weights, total)
        rng = np.random.default_rng(seed)
        which, items = [], []
        for k, (part, count) in enumerate(zip(self.parts, self.counts.tolist(), strict=True)):
            repeats = -(-count // len(part))
            order = np.concatenate([rng.permutation(len(part)) for _ in range(repeats)])[:count]
            which.append(np.full(count, k, dtype=np.int64))
            items.append(order.astype(np.int64))
        shuffle = rng.permutation(total)
        self._part = np.concatenate(which)[shuffle]
        self._item = np.concatenate(items)[shuffle]
        self.collate = self.parts[0].collate
        logger.info("mixed %d examples per epoch: %s", total, ", ".join(
            f"{getattr(p, 'name', None) or _name(p)}: {c} ({c / len(p):.2f}x of {len(p)})"
            for p, c in zip(self.parts, self.counts.tolist(), strict=True)))

    def __len__(self) -> int:
        return len(self._part)

    def __getitem__(self, j: int) -> Any:
        return self.parts[int(self._part[j])][int(self._item[j])]

    def source_of(self, j: int) -> tuple[int, int]:
        """(dataset index, item index) of example ``j``."""
        return int(self._part[j]), int(self._item[j])

    def where(self, j: int) -> str:
        k, i = self.source_of(j)
        where = getattr(self.parts[k], "where", None)
        return where(i) if where is not None else f"mixed dataset {k} item {i}"


def _name(part) -> str:
    rows = getattr(part, "rows", None)
    return getattr(rows, "name", type(part).__name__)


def _batch_kind(part) -> tuple:
    """What decides how a dataset's examples are batched (its collate)."""
    from tunekit.data.packing import PackedDataset

    packed = isinstance(part, PackedDataset) or bool(getattr(part, "packed", False))
    if isinstance(part, torch.utils.data.IterableDataset):
        raise UserError("mix_datasets mixes map-style datasets; a streaming dataset (streaming: true) cannot be mixed")
    return (type(part).__name__, "packed", part.max_seq_len) if packed else (type(part).__name__, "unpacked")


@config_nodes("datasets")
def mix_datasets(tokenizer, datasets: Sequence[Mapping[str, Any]], *, num_examples: int | None = None,
                 seed: int = 0) -> MixedDataset:
    """Several datasets mixed by weight (see the module docstring). ``datasets``: a list of
    ``{weight: float, dataset: <dataset component or a built dataset>}``."""
    parts, weights = [], []
    for k, entry in enumerate(datasets):
        if not isinstance(entry, Mapping) or set(entry) != {"weight", "dataset"}:
            raise UserError(f"mix_datasets: datasets[{k}] must be {{weight: ..., dataset: {{_component_: ...}}}}, "
                            f"got keys {sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__}")
        node = entry["dataset"]
        parts.append(instantiate(node, tokenizer) if isinstance(node, Mapping) else node)
        weights.append(entry["weight"])
    return MixedDataset(parts, weights, num_examples=num_examples, seed=seed)
