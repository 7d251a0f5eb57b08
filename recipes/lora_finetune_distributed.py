"""LoRA, DoRA and QLoRA fine-tuning on several processes (GPUs or CPU ranks) with FSDP2.

    tunekit run --nproc_per_node 2 lora_finetune_distributed --config llama3_2/1B_lora
    tunekit run --nproc_per_node 8 lora_finetune_distributed --config llama3_1/8B_qlora resume=true
    tunekit run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 \\
        lora_finetune_distributed --config llama3_1/8B_lora          # on every node (docs/distributed.md)

The single-device recipe's loop, data parallel: each of N processes holds 1/N of every weight
(one FSDP unit per decoder layer), takes ``batch_size`` examples of every micro-batch (the global
batch is ``batch_size x N x gradient_accumulation_steps``) and the loss is normalised by the
labelled tokens of all ranks, so N processes follow the single-device loss curve of the same
global batch. Rank 0 reads the checkpoint; the other ranks build the model on the meta device and
receive their shards. ``dtype: bf16`` computes in bf16 (FSDP mixed precision) while the adapters
train in fp32 and gradients are reduced in fp32; the frozen base stays bf16 (NF4 with
``lora.quantize_base``). Checkpoints are the single-device ``step_<N>/`` folders (merged HF model
and ``adapter/`` written by rank 0) whose ``recipe_state/`` holds sharded DCP state: ``resume=true``
works with the same or another number of processes. docs/distributed.md explains the keys.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from torch import nn

import tunekit.config
from tunekit.config import instantiate
from tunekit.models.vocabulary import check_tokenizer_fits
from tunekit.training.activation_offloading import offload_activations
from tunekit.training.checkpoint_files import write_lora_model
from tunekit.training.cpu_allocator import keep_freed_cpu_memory
from tunekit.training.data_loaders import batches_per_epoch, count_training_steps, training_loader
from tunekit.training.device import get_device, get_dtype
from tunekit.training.early_stopping import ValidationWatch
from tunekit.training.evaluation import build_eval_loaders, evaluate_all
from tunekit.training.fsdp import gather_full_state_dict, no_grad_sync, shard_from_rank0
from tunekit.training.interrupt import stop_on_interrupt
from tunekit.training.metric_logging import rank_zero_metric_logger
from tunekit.training.process_group import (
    any_rank,
    global_token_count,
    init_distributed,
    local_device,
    log_rank_zero,
    run_distributed_recipe,
    sum_over_ranks,
)
from tunekit.training.recipe_config import FSDP, LORA, MODEL_AND_DATA_KEYS, RUN_KEYS, TRAINING_LOOP_KEYS
from tunekit.training.recipe_models import (
    build_lora_model,
    lora_architecture,
    lora_model_from_state_dict,
    quantize_lora_bases,
)
from tunekit.training.resume import restore_sharded_training_state, resume_dir_of, save_sharded_training_state
from tunekit.training.rng import set_seed
from tunekit.training.step_checkpoints import save_step_checkpoint
from tunekit.training.train_step import (
    check_finite_step,
    clip_gradients,
    move_batch,
    step_metrics,
    step_started,
    training_steps,
)

log = logging.getLogger("tunekit.recipes.lora_finetune_distributed")

# Every key this recipe reads; `tunekit validate` checks a config against it (docs/recipes.md).
CONFIG = {**RUN_KEYS, **MODEL_AND_DATA_KEYS, "lora": LORA, **TRAINING_LOOP_KEYS, "fsdp": FSDP}


def build_model(cfg, device: torch.device, dtype: torch.dtype, rank: int) -> nn.Module:
    """The LoRA model of ``cfg``, sharded over all ranks. Rank 0 builds it exactly as the
    single-device recipe does (same adapters for the same seed), the others on the meta device;
    QLoRA bases are quantized unit by unit, after their full weight arrived on every rank."""
    if rank == 0:
        model = build_lora_model(cfg.model, cfg.lora, dtype=dtype, device="cpu", quantize_base=False)
    else:
        model = lora_architecture(cfg.checkpoint_dir, cfg.lora, dtype=dtype)
    mixed_precision = dtype != torch.float32
    for p in model.parameters():
        if p.requires_grad and mixed_precision:
            p.data = p.data.float()  # fp32 adapters and optimizer state; FSDP casts them for compute
    shard_from_rank0(model, device=device, before_shard=quantize_lora_bases if cfg.lora.quantize_base else None,
                     mp_dtype=dtype if mixed_precision else None, reduce_dtype=torch.float32,
                     reshard_after_forward=cfg.fsdp.reshard_after_forward,
                     activation_checkpointing=cfg.activation_checkpointing, cpu_offload=cfg.fsdp.cpu_offload)
    if cfg.compile:
        for layer in model.layers:
            layer.compile()
    return model


def train_step(cfg, model: nn.Module, micro_batches: list, *, trainable: list, optimizer, lr_scheduler,
               device: torch.device, step: int, epoch: int) -> dict:
    """One data-parallel optimizer step: forward + summed token loss and backward for each
    micro-batch, divided by the labelled tokens of the step on ALL ranks (so the summed gradients
    equal the single-device mean); gradients are reduced across ranks once, on the last
    micro-batch. Then clip (global norm), stop if anything is non-finite (every rank sees the same
    global loss and norm), update the adapters and the lr. Returns the step's metrics (all ranks)."""
    started = step_started(device)
    num_tokens = global_token_count([b["labels"] for b in micro_batches])  # collective
    loss = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        batch = move_batch(batch, device)
        with offload_activations(device, enabled=cfg.activation_offloading):
            micro_loss = model(batch["tokens"], labels=batch["labels"], mask=batch.get("mask"),
                               input_pos=batch.get("input_pos")) / num_tokens
        with no_grad_sync(model, enabled=i < len(micro_batches) - 1):
            micro_loss.backward()
        loss += micro_loss.detach()
    grad_norm = clip_gradients(trainable, cfg.max_grad_norm)
    (step_loss,) = sum_over_ranks(loss.item())
    check_finite_step(step, loss=step_loss, grad_norm=grad_norm, model=model, output_dir=cfg.output_dir)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = lr_scheduler.get_last_lr()[0]
    lr_scheduler.step()
    return step_metrics(started, micro_batches, loss=step_loss, lr=lr, grad_norm=grad_norm, epoch=epoch,
                        device=device)


def save_checkpoint(cfg, model: nn.Module, step: int, progress: dict, best: dict | None = None) -> Path:
    """``step_<N>/`` as the single-device recipe writes it (merged HF model and PEFT ``adapter/``,
    from rank 0) with sharded resume state from every rank, committed atomically by rank 0."""

    def write(folder: Path) -> None:
        full = gather_full_state_dict(model)  # collective; CPU tensors on rank 0 only
        save_sharded_training_state(folder, model=model, trainable_only=True, **progress)  # collective
        if full:  # rank 0 writes last, so a failure here cannot leave the other ranks in a collective
            write_lora_model(folder, lora_model_from_state_dict(cfg.checkpoint_dir, cfg.lora, full),
                             cfg.checkpoint_dir)

    path = save_step_checkpoint(cfg.output_dir, step, write, keep_last_n=cfg.keep_last_n, best=best)
    log_rank_zero(log, f"saved {path}")
    return path


def main(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = get_device(cfg.device)
    if device.type == "cpu":
        keep_freed_cpu_memory()  # reuse freed activations instead of page-faulting fresh ones each step
    dtype = get_dtype(cfg.dtype, device)
    rank, world_size = init_distributed(device)
    device = local_device(device)
    resume_dir = resume_dir_of(cfg.output_dir, resume=cfg.resume, resume_from=cfg.resume_from)
    set_seed(cfg.seed)

    model = build_model(cfg, device, dtype, rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log_rank_zero(log, f"{world_size} processes; trainable parameters: {sum(p.numel() for p in trainable):,}")

    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer, model, model_source=cfg.checkpoint_dir)
    train_set = instantiate(cfg.dataset, tokenizer)
    loader, sampler = training_loader(train_set, batch_size=cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed,
                                      num_workers=cfg.num_workers, rank=rank, world_size=world_size)
    # every rank evaluates the same global batches: the numbers of the single-device recipe
    eval_sets = build_eval_loaders({"val_loss": cfg.val_dataset, "forget_loss": cfg.forget_dataset}, tokenizer,
                                   batch_size=cfg.batch_size * world_size, num_workers=cfg.num_workers,
                                   tasks=cfg.eval_tasks)

    watch = ValidationWatch(cfg.keep_best, cfg.early_stopping, evaluated=eval_sets)  # checks keep_best / early_stopping
    _, total_steps = count_training_steps(batches_per_epoch(loader), epochs=cfg.epochs, max_steps=cfg.max_steps,
                                          gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    optimizer = instantiate(cfg.optimizer, trainable)
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)

    step, epoch = 0, 0
    set_seed(cfg.seed + rank)  # each rank its own dropout stream
    if resume_dir is not None:
        step, epoch = restore_sharded_training_state(resume_dir, model=model, optimizer=optimizer,
                                                     lr_scheduler=lr_scheduler, sampler=sampler,
                                                     trainable_only=True, seed=cfg.seed, watch=watch)
        log_rank_zero(log, f"resumed from {resume_dir} at step {step}, epoch {epoch}")

    logger = rank_zero_metric_logger(cfg.output_dir, cfg.metric_logging, config=cfg, total_steps=total_steps,
                                     initial_step=step, log_every=cfg.log_every_n_steps)
    with stop_on_interrupt() as stop, logger:
        model.train()
        batches = training_steps(loader, sampler, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                 step=step, epoch=epoch, total_steps=total_steps)
        for step, epoch, consumed, micro_batches in batches:
            metrics = train_step(cfg, model, micro_batches, trainable=trainable, optimizer=optimizer,
                                 lr_scheduler=lr_scheduler, device=device, step=step, epoch=epoch)
            if step % cfg.eval_every_n_steps == 0 or step == total_steps:
                metrics.update(evaluate_all(model, eval_sets, device=device, max_batches=cfg.eval_max_batches))
            logger.log(step, metrics)
            decision = watch.update(step, metrics)  # keep_best, early_stopping, overfitting warning
            stopping = any_rank(stop.is_set)  # every rank must take the same branch
            if step % cfg.save_every_n_steps == 0 or step == total_steps or stopping or decision.save:
                progress = dict(step=step, epoch=epoch, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                sampler=sampler, consumed=consumed, watch=watch)
                save_checkpoint(cfg, model, step, progress, best=watch.best_record)
            if stopping or decision.stop:
                log_rank_zero(log, f"stopped at step {step}" + ("" if decision.stop else "; continue with resume=true"))
                return
    log_rank_zero(log, f"done: {step} steps, checkpoints in {cfg.output_dir}")


if __name__ == "__main__":
    # errors as one line on every rank; leaves without interpreter finalization (a rare gloo abort there)
    run_distributed_recipe(lambda: main(tunekit.config.parse(sys.argv[1:], CONFIG)))
