"""What the training recipes' step needs besides the method itself: the optimizer steps of a run
(gradient-accumulation groups, epoch after epoch, resumable), moving a batch, clipping, the
non-finite guard, the step's metrics, and the evaluation loss.

The recipes own the step (forward + loss, backward, clip, optimizer and lr steps). Its loss is the
sum of token cross-entropies over all its micro-batches divided by the number of labelled tokens
across them (and across ranks: docs/design.md), so 4 micro-batches of 1 give the gradient of one
batch of 4.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tunekit.checkpoint.errors import NonFiniteError
from tunekit.checkpoint.step_folders import find_latest_checkpoint
from tunekit.losses.cross_entropy import count_label_tokens
from tunekit.training.metric_logging import peak_memory_gib, reset_peak_memory
from tunekit.training.process_group import sum_over_ranks


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (optional ``mask`` / ``input_pos`` stay absent)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def accumulation_groups(loader: Iterable[dict[str, torch.Tensor]], n: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Consecutive groups of ``n`` micro-batches (one optimizer step each). The last group of an
    epoch may be shorter: it is trained too (not dropped), so every example counts once per epoch.
    A short step is as valid as a full one because the recipes normalise a step's loss by what it
    holds (its labelled tokens, or its pairs), not by ``n``; only its gradient is an average over
    fewer examples."""
    if n < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {n}")
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


def training_steps(loader: Iterable[dict[str, torch.Tensor]], sampler, *, gradient_accumulation_steps: int,
                   step: int, epoch: int, total_steps: int) -> Iterator[tuple[int, int, int, list]]:
    """The optimizer steps ``step + 1 .. total_steps`` of a run, epoch after epoch:
    ``(step, epoch, consumed, micro_batches)``, where ``consumed`` counts the examples of this epoch
    taken so far (what a checkpoint stores so that resume continues mid-epoch) and
    ``micro_batches`` are the ``gradient_accumulation_steps`` batches of that step. Starting from
    the ``step`` / ``epoch`` of a resumed run continues where the sampler's position says."""
    while step < total_steps:
        sampler.set_epoch(epoch)
        consumed = sampler.position
        for micro_batches in accumulation_groups(loader, gradient_accumulation_steps):
            step += 1
            consumed += sum(examples_in(b) for b in micro_batches)
            yield step, epoch, consumed, micro_batches
            if step == total_steps:
                return
        epoch += 1


def examples_in(batch: dict[str, torch.Tensor]) -> int:
    """Dataset examples in a batch: its rows, or its pairs for a preference batch (whose rows hold
    both completions, or several pairs when packed: docs/design.md)."""
    return int(batch["num_pairs"]) if "num_pairs" in batch else len(batch["tokens"])


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Clip by global L2 norm (``max_norm`` None: only measure) and return the norm before clipping.
    With FSDP-sharded parameters the norm is over all ranks' shards, so every rank clips alike.
    A non-finite norm leaves the gradients as they are (``check_finite_step`` stops the run)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    total = nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # a partial norm per rank -> the global one (one all-reduce)
    norm = float(total)
    if max_norm is not None and math.isfinite(norm):
        nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return norm


def check_finite_step(step: int, *, loss: float, grad_norm: float, model: nn.Module, output_dir: str | Path) -> None:
    """Stop the run before step ``step`` changes any weight if its loss or gradient norm is NaN or
    infinite: raise ``NonFiniteError`` naming the step, the first parameter with a non-finite
    gradient (this rank's shard under FSDP) and the newest checkpoint, which stays as it was.
    Under a process group ``loss`` and ``grad_norm`` are global, so every rank stops at the same step."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    culprit = next((name for name, p in model.named_parameters() if p.grad is not None
                    and not bool(torch.isfinite(_local(p.grad)).all())), None)
    latest = find_latest_checkpoint(output_dir)
    raise NonFiniteError(
        f"step {step}: loss {loss} and gradient norm {grad_norm}"
        + (f"; first parameter with a non-finite gradient: {culprit}" if culprit else "")
        + "; the run stopped before updating the weights, nothing of this step was saved"
        + (f"; the last checkpoint {latest} is intact (resume=true continues from it)" if latest else "")
        + "; lower the learning rate, check the data, or use dtype=fp32")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def step_started(device: torch.device) -> float:
    """Start a step's clock and peak-memory window; pass the result to :func:`step_metrics`."""
    reset_peak_memory(device)
    return time.perf_counter()


def step_metrics(started: float, micro_batches: Sequence[dict[str, torch.Tensor]], *, loss: float, lr: float,
                 grad_norm: float, epoch: int, device: torch.device) -> dict[str, float]:
    """The logged metrics of a step: loss, lr (the lr this step used), grad_norm, epoch,
    tokens_per_second (input tokens incl. padding, of all ranks) and peak_memory_gib (this process)."""
    (tokens,) = sum_over_ranks(sum(b["tokens"].numel() for b in micro_batches))
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "epoch": epoch,
            "tokens_per_second": tokens / (time.perf_counter() - started), "peak_memory_gib": peak_memory_gib(device)}


def label_token_count(micro_batches: Sequence[dict[str, torch.Tensor]]) -> int:
    """Labelled tokens of a step's micro-batches on this process: the single-device loss
    normaliser (the distributed recipes use ``process_group.global_token_count``)."""
    return sum(count_label_tokens(b["labels"]) for b in micro_batches)


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: Iterable[dict[str, torch.Tensor]], *, device: torch.device,
                  max_batches: int | None = None) -> float:
    """Mean token cross-entropy of a ``TransformerDecoder`` over ``loader`` (the first
    ``max_batches`` batches), in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = move_batch(batch, device)
        total += model(batch["tokens"], labels=batch["labels"], mask=batch.get("mask"),
                       input_pos=batch.get("input_pos")).item()
        count += count_label_tokens(batch["labels"])
    model.train(was_training)
    return total / max(count, 1)
