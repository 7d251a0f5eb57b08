"""Full fine-tuning on several processes (GPUs or CPU ranks) with FSDP2: every weight trains.

    tunekit run --nproc_per_node 2 full_finetune_distributed --config llama3_2/1B_full
    tunekit run --nproc_per_node 8 full_finetune_distributed --config llama3_1/8B_full resume=true
    tunekit run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 \\
        full_finetune_distributed --config llama3_1/8B_full          # on every node (docs/distributed.md)

The single-device recipe's loop, data parallel: each of N processes holds 1/N of every weight,
gradient and optimizer state (one FSDP unit per decoder layer), takes ``batch_size`` examples of
every micro-batch (the global batch is ``batch_size x N x gradient_accumulation_steps``) and the
loss is normalised by the labelled tokens of all ranks, so N processes follow the single-device
loss curve of the same global batch. Rank 0 reads the checkpoint; the other ranks build the model
on the meta device and receive their shards. ``dtype: bf16`` computes in bf16 (FSDP mixed
precision) while the weights and optimizer state stay fp32 and gradients are reduced in fp32; the
HF checkpoints are written in ``dtype``. Checkpoints are the single-device ``step_<N>/`` folders
(HF model written by rank 0) whose ``recipe_state/`` holds sharded DCP state: ``resume=true``
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
from tunekit.training.checkpoint_files import write_hf_model
from tunekit.training.data_loaders import count_training_steps, train_loader
from tunekit.training.cpu_allocator import keep_freed_cpu_memory
from tunekit.training.device import get_device, get_dtype
from tunekit.training.process_group import (
    any_rank,
    destroy_distributed,
    exit_after_clean_run,
    init_distributed,
    local_device,
    log_rank_zero,
)
from tunekit.training.fsdp import gather_full_state_dict, shard_from_rank0
from tunekit.training.metric_logging import rank_zero_metric_logger
from tunekit.training.evaluation import build_eval_loaders, evaluate_all
from tunekit.training.interrupt import stop_on_interrupt
from tunekit.training.recipe_models import base_architecture
from tunekit.training.recipe_checks import check_positive_ints
from tunekit.training.resume import restore_sharded_training_state, save_sharded_training_state
from tunekit.training.rng import set_seed
from tunekit.training.sampler import ResumableSampler
from tunekit.checkpoint.step_folders import checkpoint_to_resume
from tunekit.training.step_checkpoints import save_step_checkpoint
from tunekit.training.train_step import optimizer_step, training_steps

log = logging.getLogger("tunekit.recipes.full_finetune_distributed")


def build_model(cfg, device: torch.device, dtype: torch.dtype, rank: int) -> nn.Module:
    """The model of ``cfg``, sharded over all ranks with fp32 weights: rank 0 loads the checkpoint in
    ``dtype``, the others build the architecture on the meta device and receive their shards; each
    layer is upcast to fp32 just before it is sharded (rank 0 holds one copy in ``dtype``)."""
    if rank == 0:
        model = instantiate(cfg.model, dtype=dtype, device="cpu")
    else:
        model = base_architecture(cfg.checkpoint_dir, dtype=dtype)
    model.requires_grad_(True)
    mixed_precision = dtype != torch.float32
    shard_from_rank0(model, device=device, before_shard=(lambda unit: unit.float()) if mixed_precision else None,
                     mp_dtype=dtype if mixed_precision else None, reduce_dtype=torch.float32,
                     reshard_after_forward=cfg.fsdp.reshard_after_forward,
                     activation_checkpointing=cfg.activation_checkpointing, cpu_offload=cfg.fsdp.cpu_offload)
    if cfg.compile:
        for layer in model.layers:
            layer.compile()
    return model


def save_checkpoint(cfg, model: nn.Module, step: int, progress: dict, dtype: torch.dtype) -> Path:
    """``step_<N>/`` as the single-device recipe writes it (HF model in ``dtype``, from rank 0)
    with sharded resume state from every rank, committed atomically by rank 0."""

    def write(folder: Path) -> None:
        full = gather_full_state_dict(model)  # collective; CPU tensors on rank 0 only
        if full:
            write_hf_model(folder, {k: v.to(dtype) for k, v in full.items()}, cfg.checkpoint_dir)
        del full
        save_sharded_training_state(folder, model=model, trainable_only=False, **progress)

    path = save_step_checkpoint(cfg.output_dir, step, write, keep_last_n=cfg.keep_last_n)
    log_rank_zero(log, f"saved {path}")
    return path


def main(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_positive_ints(cfg, "batch_size", "gradient_accumulation_steps", "epochs", "loss_chunks", "eval_every_n_steps",
                        "save_every_n_steps", "log_every_n_steps", optional=("max_steps", "eval_max_batches", "keep_last_n"))
    device = get_device(cfg.device)
    if device.type == "cpu":
        keep_freed_cpu_memory()  # reuse freed activations instead of page-faulting fresh ones each step
    dtype = get_dtype(cfg.dtype, device)
    rank, world_size = init_distributed(device)
    device = local_device(device)
    resume_dir = checkpoint_to_resume(cfg.output_dir, cfg.resume)
    set_seed(cfg.seed)

    model = build_model(cfg, device, dtype, rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log_rank_zero(log, f"{world_size} processes; trainable parameters: {sum(p.numel() for p in trainable):,}")

    tokenizer = instantiate(cfg.tokenizer)
    train_set = instantiate(cfg.dataset, tokenizer)
    sampler = ResumableSampler(len(train_set), rank=rank, world_size=world_size, shuffle=cfg.shuffle, seed=cfg.seed)
    loader = train_loader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers)
    # every rank evaluates the same global batches: the numbers of the single-device recipe
    eval_sets = build_eval_loaders({"val_loss": cfg.val_dataset, "forget_loss": cfg.forget_dataset}, tokenizer,
                                   batch_size=cfg.batch_size * world_size, num_workers=cfg.num_workers)

    _, total_steps = count_training_steps(len(loader), gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                          epochs=cfg.epochs, max_steps=cfg.max_steps)
    optimizer = instantiate(cfg.optimizer, trainable)
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)

    step, epoch = 0, 0
    set_seed(cfg.seed + rank)  # each rank its own random stream
    if resume_dir is not None:
        step, epoch = restore_sharded_training_state(resume_dir, model=model, optimizer=optimizer,
                                                     lr_scheduler=lr_scheduler, sampler=sampler,
                                                     trainable_only=False, seed=cfg.seed)
        log_rank_zero(log, f"resumed from {resume_dir} at step {step}, epoch {epoch}")

    logger = rank_zero_metric_logger(cfg.output_dir, total_steps=total_steps, initial_step=step,
                                     log_every=cfg.log_every_n_steps, **cfg.metric_logging)
    with stop_on_interrupt() as stop, logger:
        model.train()
        batches = training_steps(loader, sampler, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                 step=step, epoch=epoch, total_steps=total_steps)
        for step, epoch, consumed, micro_batches in batches:
            metrics = optimizer_step(model, micro_batches, parameters=trainable, optimizer=optimizer,
                                     lr_scheduler=lr_scheduler, device=device, loss_chunks=cfg.loss_chunks,
                                     max_grad_norm=cfg.max_grad_norm, offload=cfg.activation_offloading)
            metrics["epoch"] = epoch
            if step % cfg.eval_every_n_steps == 0 or step == total_steps:
                metrics.update(evaluate_all(model, eval_sets, device=device, loss_chunks=cfg.loss_chunks,
                                            max_batches=cfg.eval_max_batches))
            logger.log(step, metrics)
            stopping = any_rank(stop.is_set)  # every rank must take the same branch
            if step % cfg.save_every_n_steps == 0 or step == total_steps or stopping:
                progress = dict(step=step, epoch=epoch, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                sampler=sampler, consumed=consumed)
                save_checkpoint(cfg, model, step, progress, dtype)
            if stopping:
                log_rank_zero(log, f"stopped at step {step}; continue with resume=true")
                return
    log_rank_zero(log, f"done: {step} steps, checkpoints in {cfg.output_dir}")


if __name__ == "__main__":
    try:
        with tunekit.config.user_errors():
            main(tunekit.config.parse(sys.argv[1:]))
    finally:
        destroy_distributed()
    exit_after_clean_run()  # skips a rare gloo abort in interpreter finalization (see its docstring)
