"""Held-out evaluation of the recipes: the ``val_dataset`` / ``forget_dataset`` loaders, the
``eval_tasks`` (benchmark-style tasks, tunekit.evaluation: "forgetting" evaluation) and one call
that evaluates them all, shared by every recipe."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from tunekit.config import ConfigError, instantiate
from tunekit.evaluation import EvalTask
from tunekit.training.data_loaders import eval_loader
from tunekit.training.train_step import evaluate_loss


def build_eval_loaders(datasets: dict, tokenizer, *, batch_size: int, num_workers: int,
                       tasks: Sequence | None = None) -> dict[str, DataLoader | EvalTask]:
    """``{"val_loss": cfg.val_dataset, ...}`` -> a loader per metric name; null datasets are skipped.
    ``tasks`` (``cfg.eval_tasks``: task components, e.g. ``tunekit.evaluation.multiple_choice_task``)
    are built with the tokenizer and added under ``eval/<task name>/*``: the pattern of the metric
    names they produce (``eval/<task name>/acc``, ...), as ``ValidationWatch(evaluated=)`` takes them."""
    loaders: dict[str, DataLoader | EvalTask] = {
        name: eval_loader(instantiate(node, tokenizer), batch_size=batch_size, num_workers=num_workers)
        for name, node in datasets.items() if node is not None}
    for i, node in enumerate(tasks or ()):
        task = instantiate(node, tokenizer)
        if f"eval/{task.name}/*" in loaders:
            raise ConfigError(f"eval_tasks.{i}: a second task named {task.name!r}; give it another name= ")
        loaders[f"eval/{task.name}/*"] = task
    return loaders


def evaluate_all(model: nn.Module, loaders: dict[str, DataLoader | EvalTask], *, device: torch.device,
                 max_batches: int | None) -> dict[str, float]:
    """Mean token loss on each loader (the first ``max_batches`` batches) and each task's metrics
    (``eval/<task>/acc``, ...; every example). Sharded models: every rank evaluates the same
    batches and examples (FSDP needs every rank in each forward), so every rank gets the same
    numbers with no reduction."""
    metrics = {}
    for name, item in loaders.items():
        if isinstance(item, EvalTask):
            metrics.update({f"eval/{item.name}/{k}": v for k, v in item.evaluate(model, device=device).metrics.items()})
        else:
            metrics[name] = evaluate_loss(model, item, device=device, max_batches=max_batches)
    return metrics
