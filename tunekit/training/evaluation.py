"""Held-out losses of the recipes: the ``val_dataset`` / ``forget_dataset`` loaders and one call
that evaluates them all, shared by every recipe."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from tunekit.config import instantiate
from tunekit.training.data_loaders import eval_loader
from tunekit.training.train_step import evaluate_loss


def build_eval_loaders(datasets: dict, tokenizer, *, batch_size: int, num_workers: int) -> dict[str, DataLoader]:
    """``{"val_loss": cfg.val_dataset, ...}`` -> a loader per metric name; null datasets are skipped."""
    return {name: eval_loader(instantiate(node, tokenizer), batch_size=batch_size, num_workers=num_workers)
            for name, node in datasets.items() if node is not None}


def evaluate_all(model: nn.Module, loaders: dict[str, DataLoader], *, device: torch.device,
                 max_batches: int | None) -> dict[str, float]:
    """Mean token loss on each loader. Sharded models: every rank evaluates the same batches (FSDP
    needs every rank in each forward), so every rank gets the same numbers with no reduction."""
    return {name: evaluate_loss(model, loader, device=device, max_batches=max_batches)
            for name, loader in loaders.items()}
