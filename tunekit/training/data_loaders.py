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


def eval_loader(dataset: Dataset, *, batch_size: int, num_workers: int) -> DataLoader:
    """Evaluation batches in dataset order."""
    return _loader(dataset, batch_size, None, num_workers)


def count_training_steps(num_batches: int, *, gradient_accumulation_steps: int, epochs: int,
                         max_steps: int | None) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps of the run) for ``num_batches``
    micro-batches per epoch; ``max_steps`` caps the total. An epoch's last step takes the
    ``num_batches % gradient_accumulation_steps`` left-over micro-batches when there are any
    (``train_step.accumulation_groups``), so it counts as a step of the lr schedule too."""
    if num_batches < 1:
        raise UserError("dataset: no batches per epoch; check the dataset source and split")
    per_epoch = -(-num_batches // gradient_accumulation_steps)
    if num_batches % gradient_accumulation_steps:
        log_rank_zero(log, f"{num_batches} micro-batches per epoch: the epoch's last optimizer step accumulates the "
                    f"{num_batches % gradient_accumulation_steps} left over (gradient_accumulation_steps="
                    f"{gradient_accumulation_steps}), normalised by its own label tokens")
    total = epochs * per_epoch
    return per_epoch, total if max_steps is None else min(max_steps, total)
