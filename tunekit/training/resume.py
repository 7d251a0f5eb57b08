"""What a step checkpoint's ``recipe_state/`` holds and how a resumed run restores it.

Together with the weights this reproduces the uninterrupted run exactly on CPU: the optimizer
moments, the lr schedule position, the RNG streams (dropout) and the sampler position.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from tunekit.checkpoint.step_folders import RECIPE_STATE_DIR, checkpoint_to_resume
from tunekit.training.distributed_checkpoint import (
    load_per_rank_state,
    load_sharded_state,
    save_sharded_state,
)
from tunekit.training.early_stopping import ValidationWatch
from tunekit.training.process_group import get_world_size_and_rank, log_rank_zero
from tunekit.training.rng import get_rng_state, set_rng_state, set_seed
from tunekit.training.sampler import ResumableSampler

log = logging.getLogger("tunekit.training.resume")


def resume_dir_of(output_dir: str | os.PathLike, *, resume: bool, resume_from: str | None) -> Path | None:
    """The step folder a training run continues from (the recipes' ``resume`` / ``resume_from``
    keys; see ``tunekit.checkpoint.step_folders.checkpoint_to_resume``), saying so in one log line
    when ``resume=true`` finds nothing to resume."""
    folder = checkpoint_to_resume(output_dir, resume, resume_from)
    if resume and folder is None:
        log_rank_zero(log, f"resume=true: {output_dir} holds no step_<N>/ checkpoint yet; starting from step 0")
    return folder


def training_state(*, step: int, epoch: int, optimizer: torch.optim.Optimizer,
                   lr_scheduler: torch.optim.lr_scheduler.LRScheduler, sampler: ResumableSampler,
                   consumed: int, watch: ValidationWatch | None = None) -> dict:
    """State after optimizer step ``step`` in ``epoch``, with ``consumed`` examples of this epoch
    already used by this rank (and ``watch``'s best values, patience and loss history)."""
    return {**_progress(step, epoch, lr_scheduler, sampler, consumed, watch),
            "optimizer": optimizer.state_dict(), "rng": get_rng_state()}


def _progress(step, epoch, lr_scheduler, sampler, consumed, watch=None) -> dict:
    return {"step": step, "epoch": epoch, "lr_scheduler": lr_scheduler.state_dict(),
            "sampler": sampler.state_dict(consumed=consumed),
            "watch": None if watch is None else watch.state_dict()}


def restore_training_state(state: dict, *, optimizer: torch.optim.Optimizer,
                           lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
                           sampler: ResumableSampler, watch: ValidationWatch | None = None) -> tuple[int, int]:
    """Load ``state`` into the given objects and the RNGs; returns (step, epoch). Call it last
    in set-up, after anything that draws random numbers (model init, LoRA init)."""
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    sampler.load_state_dict(state["sampler"])
    if watch is not None:
        watch.load_state_dict(state.get("watch"))
    set_rng_state(state["rng"])
    return state["step"], state["epoch"]


def save_sharded_training_state(step_dir: Path, *, model: nn.Module, step: int, epoch: int,
                                optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
                                sampler: ResumableSampler, consumed: int, trainable_only: bool,
                                watch: ValidationWatch | None = None) -> None:
    """The distributed recipes' ``recipe_state/``: model (only the trainable parameters with
    ``trainable_only``) and optimizer as DCP shards written by every rank, progress (step, epoch,
    lr schedule, data position) from rank 0 and each rank's RNG streams. Collective."""
    folder = Path(step_dir) / RECIPE_STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_sharded_state(folder, model, optimizer, _progress(step, epoch, lr_scheduler, sampler, consumed, watch),
                       per_rank={"rng": get_rng_state()}, trainable_only=trainable_only)


def restore_sharded_training_state(step_dir: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                                   lr_scheduler: torch.optim.lr_scheduler.LRScheduler, sampler: ResumableSampler,
                                   trainable_only: bool, seed: int, watch: ValidationWatch | None = None
                                   ) -> tuple[int, int]:
    """Load what ``save_sharded_training_state`` wrote, with this or another number of processes
    (DCP reshards; the data position is converted). Returns (step, epoch). Each rank's RNG streams
    come back when the process count is unchanged; otherwise every rank is seeded with
    ``seed + rank + step`` (exact resume needs the same process count). Collective."""
    folder = Path(step_dir) / RECIPE_STATE_DIR
    state = load_sharded_state(folder, model, optimizer, trainable_only=trainable_only)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    sampler.load_state_dict(state["sampler"])
    if watch is not None:
        watch.load_state_dict(state.get("watch"))
    per_rank = load_per_rank_state(folder)
    if per_rank is not None:
        set_rng_state(per_rank["rng"])
    else:
        set_seed(seed + get_world_size_and_rank()[1] + state["step"])
    return state["step"], state["epoch"]
