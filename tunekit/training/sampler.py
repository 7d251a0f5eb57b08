"""A resumable, rank-aware sampler: the same order of examples after a restart.

Each epoch is a permutation of the dataset (seeded by ``seed + epoch``) split round-robin over
ranks; every rank gets the same number of indices (the permutation is padded by wrapping
around, or cut with ``drop_last``). ``state_dict`` records the epoch and how many indices this
rank has consumed in it, so a resumed run continues with exactly the next example.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from tunekit.config.errors import UserError


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Sampler over ``range(dataset_len)`` for rank ``rank`` of ``world_size``.

    Position counting: every index yielded counts as consumed. With a DataLoader that prefetches
    (``num_workers > 0``) the sampler runs ahead of training, so a recipe should pass what it
    actually consumed: ``state_dict(consumed=batches_done * batch_size)``.
    """

    def __init__(self, dataset_len: int, *, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if dataset_len < 1:
            raise UserError("ResumableSampler: the dataset is empty; check the dataset source and split")
        if not 0 <= rank < world_size:
            raise ValueError(f"ResumableSampler: rank {rank} is outside world_size {world_size}")
        if drop_last and dataset_len < world_size:
            raise UserError(f"ResumableSampler: {dataset_len} examples cannot feed {world_size} ranks with drop_last")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.position = 0  # indices of this rank consumed in the current epoch

    def __len__(self) -> int:
        """Indices per rank per epoch (the full epoch, independent of the resume position)."""
        if self.drop_last:
            return self.dataset_len // self.world_size
        return math.ceil(self.dataset_len / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (a no-op on the position when resuming into
        the same epoch that ``load_state_dict`` restored)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        total = len(self) * self.world_size
        if total > len(order):
            order = (order * math.ceil(total / len(order)))[:total]
        return order[:total][self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        indices = self._indices()
        for i in range(self.position, len(indices)):
            self.position = i + 1
            yield indices[i]
        # Epoch finished (or restored as finished): iterating again without set_epoch starts over.
        self.position = 0

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """{"epoch", "position", "seed", "dataset_len", "world_size"}; ``consumed`` overrides the
        position (see the class docstring). The state is the same on every rank."""
        position = self.position if consumed is None else consumed
        return {"epoch": self.epoch, "position": position, "seed": self.seed, "dataset_len": self.dataset_len,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where ``state`` stopped, also with another number of ranks: the epoch order
        does not depend on the world size, and ``position * world_size`` examples of it were
        consumed (which must split evenly over the new ranks)."""
        if state["dataset_len"] != self.dataset_len or state["seed"] != self.seed:
            raise UserError(
                f"ResumableSampler: the checkpoint was saved for a dataset of {state['dataset_len']} examples with "
                f"seed {state['seed']}, this run has {self.dataset_len} and seed {self.seed}; resume with the same "
                "data and seed (or start a fresh output_dir)")
        consumed = state["position"] * state.get("world_size", 1)
        if consumed % self.world_size:
            raise UserError(
                f"ResumableSampler: the checkpoint stopped after {consumed} examples of epoch {state['epoch']}, which "
                f"do not split over {self.world_size} processes; resume with a process count dividing {consumed}")
        self.epoch, self.position = state["epoch"], consumed // self.world_size
