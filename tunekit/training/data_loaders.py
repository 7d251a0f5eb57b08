"""DataLoaders for the recipes: batches follow the Batch contract via each dataset's ``collate``."""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader, Dataset

from tunekit.config.errors import UserError
from tunekit.training.process_group import log_rank_zero
from tunekit.training.sampler import ResumableSampler

log = logging.getLogger("tunekit.training.data_loaders")


def _loader(dataset: Dataset, batch_size: int, sampler, num_workers: int) -> DataLoader:
    # A private generator: without it every iter(loader) draws a seed from torch's global RNG,
    # and a resumed run (which starts iterating mid-epoch) would drift from the uninterrupted one.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=dataset.collate,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(0),
                      persistent_workers=False)


def train_loader(dataset: Dataset, *, batch_size: int, sampler: ResumableSampler, num_workers: int) -> DataLoader:
    """Training batches in the (resumable) order of ``sampler``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _loader(dataset, batch_size, sampler, num_workers)


def training_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                    rank: int = 0, world_size: int = 1) -> tuple[DataLoader, ResumableSampler]:
    """(loader, sampler) of a recipe's training data. The sampler is what ``training_steps`` and
    the checkpoint's data position use: a :class:`ResumableSampler` over a map-style dataset
    (this rank's share of each epoch's seeded permutation), or, for a streaming dataset
    (``torch.utils.data.IterableDataset`` such as ``StreamingPackedDataset``), the dataset itself,
    given this rank's share; a stream is read in this process (``num_workers`` 0), which is
    where its position is tracked."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if num_workers:
            log_rank_zero(log, f"num_workers={num_workers} ignored: a streaming dataset is read in the training process")
        dataset.shard(rank=rank, world_size=world_size, shuffle=shuffle, seed=seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return _loader(dataset, batch_size, None, 0), dataset
    sampler = ResumableSampler(len(dataset), rank=rank, world_size=world_size, shuffle=shuffle, seed=seed)
    return train_loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers), sampler


def batches_per_epoch(loader: DataLoader) -> int | None:
    """Micro-batches per epoch of a training loader; None for a stream (its length is unknown)."""
    return None if isinstance(loader.dataset, torch.utils.data.IterableDataset) else len(loader)


def eval_loader(dataset: Dataset, *, batch_size: int, num_workers: int) -> DataLoader:
    """Evaluation batches in dataset order."""
    return _loader(dataset, batch_size, None, num_workers)


def count_training_steps(num_batches: int | None, *, gradient_accumulation_steps: int, epochs: int,
                         max_steps: int | None) -> tuple[int | None, int]:
    """(optimizer steps per epoch, total optimizer steps of the run) for ``num_batches``
    micro-batches per epoch (None: a stream, then ``max_steps`` is the total); ``max_steps`` caps the
    total. An epoch's last step takes the
    ``num_batches % gradient_accumulation_steps`` left-over micro-batches when there are any
    (``train_step.accumulation_groups``), so it counts as a step of the lr schedule too."""
    if num_batches is None:  # a stream: the run is as long as max_steps says
        if max_steps is None:
            raise UserError("max_steps: a streaming dataset (streaming: true) has no known length; set max_steps "
                            "(the run's optimizer steps; epochs still counts passes over the stream for the logs)")
        return None, max_steps
    if num_batches < 1:
        raise UserError("dataset: no batches per epoch; check the dataset source and split")
    per_epoch = -(-num_batches // gradient_accumulation_steps)
    if num_batches % gradient_accumulation_steps:
        log_rank_zero(log, f"{num_batches} micro-batches per epoch: the epoch's last optimizer step accumulates the "
                    f"{num_batches % gradient_accumulation_steps} left over (gradient_accumulation_steps="
                    f"{gradient_accumulation_steps}), normalised by its own label tokens")
    total = epochs * per_epoch
    return per_epoch, total if max_steps is None else min(max_steps, total)
