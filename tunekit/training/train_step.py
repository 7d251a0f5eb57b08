"""One optimizer step of gradient accumulation, and the evaluation loss.

The step's loss is the sum of token cross-entropies over all its micro-batches divided by the
number of labelled tokens across them (docs/design.md), so 4 micro-batches of 1 give the same
gradient as one batch of 4.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from tunekit.modules.transformer import TransformerDecoder
from tunekit.training.activation_offloading import offload_activations
from tunekit.training.process_group import global_token_count, sum_over_ranks
from tunekit.training.fsdp import no_grad_sync
from tunekit.modules.cross_entropy import chunked_cross_entropy, count_label_tokens
from tunekit.training.metric_logging import peak_memory_gib, reset_peak_memory


def move_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], *, loss_chunks: int) -> torch.Tensor:
    """Summed token cross-entropy of one batch (tokens/labels [b, s], optional mask/input_pos).

    A ``TransformerDecoder`` computes it inside its forward with the output projection fused
    into the loss (no [b, s, vocab] logits); any other model returns logits, and the loss is
    taken in ``loss_chunks`` pieces."""
    inputs = {"mask": batch.get("mask"), "input_pos": batch.get("input_pos")}
    if isinstance(model, TransformerDecoder):
        return model(batch["tokens"], labels=batch["labels"], **inputs)
    return chunked_cross_entropy(model(batch["tokens"], **inputs), batch["labels"], num_chunks=loss_chunks)


def accumulate_gradients(model: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]], *,
                         device: torch.device, loss_chunks: int, num_label_tokens: int | torch.Tensor | None = None,
                         grad_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
                         offload: bool = False) -> float:
    """Forward and backward every micro-batch, adding ``d(summed loss / N)`` to the gradients,
    where N = ``num_label_tokens`` (default: the labelled tokens of ``micro_batches``; the
    distributed recipes pass the count over all ranks). ``grad_sync(is_last)`` may return a
    context that suppresses gradient reduction on all but the last micro-batch. ``offload`` keeps
    the activations saved for backward in host memory (``activation_offloading``).
    Returns this process's summed loss / N (the step loss on one device)."""
    if num_label_tokens is None:
        num_label_tokens = sum(count_label_tokens(b["labels"]) for b in micro_batches)
    denominator = max(int(num_label_tokens), 1)
    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        context = grad_sync(i == len(micro_batches) - 1) if grad_sync is not None else contextlib.nullcontext()
        with context:
            with offload_activations(device, enabled=offload):
                loss = batch_loss_sum(model, move_batch(batch, device), loss_chunks=loss_chunks) / denominator
            loss.backward()
        total += loss.detach()
    return total.item()  # one device sync per step, not one per micro-batch


def accumulation_groups(loader: Iterable[dict[str, torch.Tensor]], n: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Consecutive groups of ``n`` micro-batches (one optimizer step each); an incomplete last
    group is dropped, so every step sees the same number of micro-batches."""
    if n < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {n}")
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


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
            consumed += sum(len(b["tokens"]) for b in micro_batches)
            yield step, epoch, consumed, micro_batches
            if step == total_steps:
                return
        epoch += 1


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float | None) -> float:
    """Clip by global L2 norm (``max_norm`` None: only measure) and return the norm before clipping.
    With FSDP-sharded parameters the norm is over all ranks' shards, so every rank clips alike."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    norm = nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # a partial norm per rank -> the global one (one all-reduce)
    if max_norm is not None:
        nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def optimizer_step(model: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]], *,
                   parameters: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer,
                   lr_scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, loss_chunks: int,
                   max_grad_norm: float | None, offload: bool = False) -> dict[str, float]:
    """One training step: accumulate the micro-batches' gradients, clip ``parameters``, step the
    optimizer and the lr schedule. Returns the step's metrics: loss, lr (the lr this step used),
    grad_norm, tokens_per_second (input tokens incl. padding) and peak_memory_gib (this process).

    Under a process group with an FSDP-sharded model (the distributed recipes) the same call is
    data parallel: the loss is normalised by the labelled tokens of all ranks, gradients are
    reduced once per step (not per micro-batch), and loss and tokens/s cover all ranks.
    """
    reset_peak_memory(device)
    start = time.perf_counter()
    loss = accumulate_gradients(model, micro_batches, device=device, loss_chunks=loss_chunks, offload=offload,
                                num_label_tokens=global_token_count([b["labels"] for b in micro_batches]),
                                grad_sync=lambda is_last: no_grad_sync(model, enabled=not is_last))
    tokens = sum(b["tokens"].numel() for b in micro_batches)
    loss, tokens = sum_over_ranks(loss, tokens)
    grad_norm = clip_gradients(parameters, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = lr_scheduler.get_last_lr()[0]
    lr_scheduler.step()
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_second": tokens / (time.perf_counter() - start), "peak_memory_gib": peak_memory_gib(device)}


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: Iterable[dict[str, torch.Tensor]], *, device: torch.device,
                  loss_chunks: int, max_batches: int | None = None) -> float:
    """Mean token cross-entropy over ``loader`` (the first ``max_batches`` batches), in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        total += batch_loss_sum(model, move_batch(batch, device), loss_chunks=loss_chunks).item()
        count += count_label_tokens(batch["labels"])
    model.train(was_training)
    return total / max(count, 1)
