"""Learning-rate schedules as ``LambdaLR`` multipliers of the optimizer's base lr.

Built with ``tunekit.config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=...)``.
Step the scheduler once per optimizer step; its ``state_dict`` resumes exactly.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from tunekit.config.errors import UserError


def _cosine_factor(step: int, num_warmup_steps: int, num_training_steps: int, num_cycles: float,
                   min_lr_ratio: float) -> float:
    if step < num_warmup_steps:
        return (step + 1) / (num_warmup_steps + 1)
    progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    progress = min(progress, 1.0)
    cosine = 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def _constant_factor(step: int, num_warmup_steps: int) -> float:
    return (step + 1) / (num_warmup_steps + 1) if step < num_warmup_steps else 1.0


def cosine_with_warmup(optimizer: torch.optim.Optimizer, num_warmup_steps: int, num_training_steps: int,
                       num_cycles: float = 0.5, min_lr_ratio: float = 0.0, last_epoch: int = -1) -> LambdaLR:
    """Linear warmup over ``num_warmup_steps`` (the first step already uses a small non-zero lr),
    then a half cosine from the base lr down to ``min_lr_ratio * lr`` at ``num_training_steps``."""
    _check(num_warmup_steps, num_training_steps)
    factor = functools.partial(_cosine_factor, num_warmup_steps=num_warmup_steps,
                               num_training_steps=num_training_steps, num_cycles=num_cycles,
                               min_lr_ratio=min_lr_ratio)
    return LambdaLR(optimizer, factor, last_epoch)


def constant_with_warmup(optimizer: torch.optim.Optimizer, num_warmup_steps: int,
                         num_training_steps: int | None = None, last_epoch: int = -1) -> LambdaLR:
    """Linear warmup, then the base lr. ``num_training_steps`` is accepted (and ignored) so every
    schedule takes the same arguments from a recipe."""
    _check(num_warmup_steps, num_training_steps)
    return LambdaLR(optimizer, functools.partial(_constant_factor, num_warmup_steps=num_warmup_steps), last_epoch)


def _check(num_warmup_steps: int, num_training_steps: int | None) -> None:
    if num_warmup_steps < 0:
        raise UserError(f"lr_scheduler.num_warmup_steps must be >= 0, got {num_warmup_steps}")
    if num_training_steps is not None and num_training_steps < 1:
        raise UserError(f"lr schedule: num_training_steps must be >= 1, got {num_training_steps}; "
                        "check epochs / max_steps and the dataset size")
