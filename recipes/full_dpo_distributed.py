"""Full-parameter preference tuning on one or several processes (GPUs or CPU ranks) with FSDP2:
DPO and its family, SimPO / CPO / ORPO and KTO, chosen by ``loss.loss_type``.

    tunekit run full_dpo_distributed --config tiny/full_dpo                       # one process
    tunekit run --nproc_per_node 2 full_dpo_distributed --config qwen3/0.6B_full_dpo
    tunekit run --nproc_per_node 8 full_dpo_distributed --config qwen3/0.6B_full_dpo precompute_reference=true

Every weight trains, so the reference is a second, frozen copy of the starting checkpoint,
sharded like the policy (each rank holds 1/N of it); with ``precompute_reference: true`` it is
built only to compute the log-probs of the data once (cached on disk) and freed before training,
and reference-free losses (SimPO, CPO, ORPO) never build it. Otherwise lora_dpo_distributed's
step and full_finetune_distributed's model, checkpoints (HF model in ``dtype`` from rank 0,
sharded resume state) and mixed precision. docs/preference.md explains every key.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import torch
from torch import nn

import tunekit.config
from tunekit.checkpoint.step_folders import find_model_dir
from tunekit.config import instantiate
from tunekit.models.vocabulary import check_tokenizer_fits
from tunekit.training.activation_offloading import offload_activations
from tunekit.training.checkpoint_files import write_hf_model
from tunekit.training.cpu_allocator import keep_freed_cpu_memory
from tunekit.training.data_loaders import batches_per_epoch, count_training_steps, eval_loader, training_loader
from tunekit.training.device import get_device, get_dtype
from tunekit.training.early_stopping import ValidationWatch
from tunekit.training.evaluation import build_eval_loaders, evaluate_all
from tunekit.training.fsdp import gather_full_state_dict, no_grad_sync, shard_from_rank0
from tunekit.training.interrupt import stop_on_interrupt
from tunekit.training.metric_logging import rank_zero_metric_logger
from tunekit.training.process_group import (
    any_rank,
    init_distributed,
    local_device,
    log_rank_zero,
    run_distributed_recipe,
    sum_over_ranks,
)
from tunekit.training.preference import (
    PreferenceMetrics,
    check_batch_fits_loss,
    evaluate_preference,
    mean_chosen_tokens,
    needs_reference,
    preference_objective,
    reference_logps,
    sequence_logps,
    with_precomputed_reference,
)
from tunekit.training.recipe_config import FSDP, MODEL_AND_DATA_KEYS, PREFERENCE_KEYS, RUN_KEYS, TRAINING_LOOP_KEYS
from tunekit.training.recipe_models import base_architecture
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

log = logging.getLogger("tunekit.recipes.full_dpo_distributed")

# Every key this recipe reads; `tunekit validate` checks a config against it (docs/preference.md).
CONFIG = {**RUN_KEYS, **MODEL_AND_DATA_KEYS, **PREFERENCE_KEYS, **TRAINING_LOOP_KEYS, "fsdp": FSDP}


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


def build_reference(cfg, device: torch.device, dtype: torch.dtype, rank: int) -> nn.Module:
    """The frozen reference: the starting checkpoint again, sharded like the policy but kept in
    ``dtype`` (it has no optimizer state and no gradients), in eval mode."""
    model = instantiate(cfg.model, dtype=dtype, device="cpu") if rank == 0 else base_architecture(
        cfg.checkpoint_dir, dtype=dtype)
    model.requires_grad_(False)
    shard_from_rank0(model, device=device, reshard_after_forward=cfg.fsdp.reshard_after_forward,
                     cpu_offload=cfg.fsdp.cpu_offload)
    return model.eval()


def train_step(cfg, model: nn.Module, micro_batches: list, *, trainable: list, optimizer, lr_scheduler,
               device: torch.device, step: int, epoch: int, reference: nn.Module | None) -> dict:
    """One data-parallel optimizer step: for each micro-batch the reference log-probs (the frozen
    ``reference``, no gradient; or precomputed), the policy's log-probs of chosen and rejected in one
    forward, the loss of every pair divided by the step's pairs on ALL ranks, and backward
    (gradients reduced across ranks on the last micro-batch only); clip (global norm), stop if
    anything is non-finite (every rank sees the same global loss and norm), update every weight
    and the lr. Returns the step's metrics (all ranks)."""
    started = step_started(device)
    (num_pairs,) = sum_over_ranks(sum(int(b["num_pairs"]) for b in micro_batches))  # collective
    nll_tokens = mean_chosen_tokens(micro_batches)  # collective
    metrics = PreferenceMetrics()
    for i, batch in enumerate(micro_batches):
        batch = move_batch(batch, device)
        ref = reference_logps(batch, reference=reference) if needs_reference(cfg.loss) else None
        with offload_activations(device, enabled=cfg.activation_offloading):
            policy = sequence_logps(model, batch)
            objective = preference_objective(cfg.loss, batch, policy, ref, mean_chosen_tokens=nll_tokens)
            loss = objective.losses.sum() / num_pairs
        with no_grad_sync(model, enabled=i < len(micro_batches) - 1):
            loss.backward()
        metrics.add(objective, policy, batch)
    grad_norm = clip_gradients(trainable, cfg.max_grad_norm)
    results = metrics.means()  # collective: sums over ranks
    check_finite_step(step, loss=results["loss"], grad_norm=grad_norm, model=model, output_dir=cfg.output_dir)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = lr_scheduler.get_last_lr()[0]
    lr_scheduler.step()
    return {**results, **step_metrics(started, micro_batches, loss=results["loss"], lr=lr, grad_norm=grad_norm,
                                      epoch=epoch, device=device)}


def save_checkpoint(cfg, model: nn.Module, step: int, progress: dict, dtype: torch.dtype,
                    best: dict | None = None) -> Path:
    """``step_<N>/`` as the single-device recipe writes it (HF model in ``dtype``, from rank 0)
    with sharded resume state from every rank, committed atomically by rank 0."""

    def write(folder: Path) -> None:
        full = gather_full_state_dict(model)  # collective; CPU tensors on rank 0 only
        save_sharded_training_state(folder, model=model, trainable_only=False, **progress)  # collective
        if full:  # rank 0 writes last, so a failure here cannot leave the other ranks in a collective
            write_hf_model(folder, {k: v.to(dtype) for k, v in full.items()}, cfg.checkpoint_dir)

    path = save_step_checkpoint(cfg.output_dir, step, write, keep_last_n=cfg.keep_last_n, best=best)
    log_rank_zero(log, f"saved {path}")
    return path


def main(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = get_device(cfg.device)
    if device.type == "cpu":
        keep_freed_cpu_memory()  # reuse freed activations instead of page-faulting fresh ones each step
    dtype = get_dtype(cfg.dtype, device)
    cfg.checkpoint_dir = str(find_model_dir(cfg.checkpoint_dir))  # an HF folder, or an SFT run's newest step_<N>/
    check_batch_fits_loss(cfg.loss, cfg.batch_size)
    rank, world_size = init_distributed(device)
    device = local_device(device)
    resume_dir = resume_dir_of(cfg.output_dir, resume=cfg.resume, resume_from=cfg.resume_from)
    set_seed(cfg.seed)

    model = build_model(cfg, device, dtype, rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log_rank_zero(log, f"{world_size} processes; trainable parameters: {sum(p.numel() for p in trainable):,}")

    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer, model, model_source=cfg.checkpoint_dir)
    # the frozen reference; with precompute_reference it is built only if the cache lacks the data's
    # log-probs, and freed once they are computed
    reference = None
    if needs_reference(cfg.loss) and not cfg.precompute_reference:
        reference = build_reference(cfg, device, dtype, rank)
    build = functools.cache(lambda: build_reference(cfg, device, dtype, rank))  # at most once
    train_set = with_precomputed_reference(cfg, build, instantiate(cfg.dataset, tokenizer), "dataset", device,
                                           adapters_off=False)
    val_set = with_precomputed_reference(cfg, build, instantiate(cfg.val_dataset, tokenizer), "val_dataset",
                                         device, adapters_off=False)
    build.cache_clear()  # a reference built for the cache is freed: training runs without it
    loader, sampler = training_loader(train_set, batch_size=cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed,
                                      num_workers=cfg.num_workers, rank=rank, world_size=world_size)
    # every rank evaluates the same global batches: the numbers of the single-device recipe
    pair_sets = {} if val_set is None else {
        "eval": eval_loader(val_set, batch_size=cfg.batch_size * world_size, num_workers=cfg.num_workers)}
    text_sets = build_eval_loaders({"forget_loss": cfg.forget_dataset}, tokenizer,
                                   batch_size=cfg.batch_size * world_size, num_workers=cfg.num_workers,
                                   tasks=cfg.eval_tasks)

    # keep_best / early_stopping: the metric must be one this run evaluates (eval_loss, ..., forget_loss)
    watch = ValidationWatch(cfg.keep_best, cfg.early_stopping, evaluated=[*(f"{n}_*" for n in pair_sets), *text_sets])
    _, total_steps = count_training_steps(batches_per_epoch(loader), epochs=cfg.epochs, max_steps=cfg.max_steps,
                                          gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    optimizer = instantiate(cfg.optimizer, trainable)
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)

    step, epoch = 0, 0
    set_seed(cfg.seed + rank)  # each rank its own random stream
    if resume_dir is not None:
        step, epoch = restore_sharded_training_state(resume_dir, model=model, optimizer=optimizer,
                                                     lr_scheduler=lr_scheduler, sampler=sampler,
                                                     trainable_only=False, seed=cfg.seed, watch=watch)
        log_rank_zero(log, f"resumed from {resume_dir} at step {step}, epoch {epoch}")

    logger = rank_zero_metric_logger(cfg.output_dir, cfg.metric_logging, config=cfg, total_steps=total_steps,
                                     initial_step=step, log_every=cfg.log_every_n_steps)
    with stop_on_interrupt() as stop, logger:
        model.train()
        batches = training_steps(loader, sampler, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                 step=step, epoch=epoch, total_steps=total_steps)
        for step, epoch, consumed, micro_batches in batches:
            metrics = train_step(cfg, model, micro_batches, trainable=trainable, optimizer=optimizer,
                                 lr_scheduler=lr_scheduler, device=device, step=step, epoch=epoch, reference=reference)
            if step % cfg.eval_every_n_steps == 0 or step == total_steps:
                metrics.update(evaluate_preference(model, pair_sets, loss_cfg=cfg.loss, device=device,
                                                   max_batches=cfg.eval_max_batches, reference=reference,
                                                   uses_reference=needs_reference(cfg.loss)))
                metrics.update(evaluate_all(model, text_sets, device=device, max_batches=cfg.eval_max_batches))
            logger.log(step, metrics)
            decision = watch.update(step, metrics)  # keep_best, early_stopping, overfitting warning
            stopping = any_rank(stop.is_set)  # every rank must take the same branch
            if step % cfg.save_every_n_steps == 0 or step == total_steps or stopping or decision.save:
                progress = dict(step=step, epoch=epoch, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                sampler=sampler, consumed=consumed, watch=watch)
                save_checkpoint(cfg, model, step, progress, dtype, best=watch.best_record)
            if stopping or decision.stop:
                log_rank_zero(log, f"stopped at step {step}" + ("" if decision.stop else "; continue with resume=true"))
                return
    log_rank_zero(log, f"done: {step} steps, checkpoints in {cfg.output_dir}")


if __name__ == "__main__":
    # errors as one line on every rank; leaves without interpreter finalization (a rare gloo abort there)
    run_distributed_recipe(lambda: main(tunekit.config.parse(sys.argv[1:], CONFIG)))
