"""What a step checkpoint's ``recipe_state/`` holds and how a resumed run restores it.

Together with the weights this reproduces the uninterrupted run exactly on CPU: the optimizer
moments, the lr schedule position, the RNG streams (dropout) and the sampler position.
"""

from __future__ import annotations

import torch

from tunekit.training.rng import get_rng_state, set_rng_state
from tunekit.training.sampler import ResumableSampler


def training_state(*, step: int, epoch: int, optimizer: torch.optim.Optimizer,
                   lr_scheduler: torch.optim.lr_scheduler.LRScheduler, sampler: ResumableSampler,
                   consumed: int) -> dict:
    """State after optimizer step ``step`` in ``epoch``, with ``consumed`` examples of this epoch
    already used by this rank."""
    return {
        "step": step,
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "sampler": sampler.state_dict(consumed=consumed),
        "rng": get_rng_state(),
    }


def restore_training_state(state: dict, *, optimizer: torch.optim.Optimizer,
                           lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
                           sampler: ResumableSampler) -> tuple[int, int]:
    """Load ``state`` into the given objects and the RNGs; returns (step, epoch). Call it last
    in set-up, after anything that draws random numbers (model init, LoRA init)."""
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    return state["step"], state["epoch"]
