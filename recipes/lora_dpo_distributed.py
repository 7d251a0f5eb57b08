"""Preference tuning with LoRA / DoRA / QLoRA on several processes (GPUs or CPU ranks) with
FSDP2: DPO and its family, SimPO / CPO / ORPO and KTO, chosen by ``loss.loss_type``.

    tunekit run --nproc_per_node 2 lora_dpo_distributed --config tiny/dpo
    tunekit run --nproc_per_node 8 lora_dpo_distributed --config llama3_1/8B_qlora_dpo precompute_reference=true

lora_dpo_single_device's loop, data parallel as lora_finetune_distributed: each process holds
1/N of every weight and takes ``batch_size`` pairs of every micro-batch; each pair's loss is
divided by the pairs of the whole step on ALL ranks (and the NLL terms' token normaliser is the
step's over all ranks too), so N processes follow the single-device loss curve of the same global
batch. The reference is the base with the adapters off (or precomputed once, each rank computing
its share). Checkpoints are the single-device ``step_<N>/`` folders with sharded resume state.
docs/preference.md explains every key, docs/distributed.md the distributed ones.
"""

from __future__ import annotations

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
from tunekit.training.checkpoint_files import write_lora_model
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
from tunekit.training.recipe_config import FSDP, LORA, MODEL_AND_DATA_KEYS, PREFERENCE_KEYS, RUN_KEYS, TRAINING_LOOP_KEYS
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

log = logging.getLogger("tunekit.recipes.lora_dpo_distributed")

# Every key this recipe reads; `tunekit validate` checks a config against it (docs/preference.md).
CONFIG = {**RUN_KEYS, **MODEL_AND_DATA_KEYS, "lora": LORA, **PREFERENCE_KEYS, **TRAINING_LOOP_KEYS, "fsdp": FSDP}


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
    """One data-parallel optimizer step: for each micro-batch the reference log-probs (adapters
    off, no gradient; or precomputed), the policy's log-probs of chosen and rejected in one
    forward, the loss of every pair divided by the step's pairs on ALL ranks, and backward
    (gradients reduced across ranks on the last micro-batch only); clip (global norm), stop if
    anything is non-finite (every rank sees the same global loss and norm), update the adapters
    and the lr. Returns the step's metrics (all ranks)."""
    started = step_started(device)
    (num_pairs,) = sum_over_ranks(sum(int(b["num_pairs"]) for b in micro_batches))  # collective
    nll_tokens = mean_chosen_tokens(micro_batches)  # collective
    metrics = PreferenceMetrics()
    for i, batch in enumerate(micro_batches):
        batch = move_batch(batch, device)
        reference = reference_logps(batch, policy=model) if needs_reference(cfg.loss) else None
        with offload_activations(device, enabled=cfg.activation_offloading):
            policy = sequence_logps(model, batch)
            objective = preference_objective(cfg.loss, batch, policy, reference, mean_chosen_tokens=nll_tokens)
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
    # with precompute_reference: the base's log-probs (adapters off) computed once, cached on disk
    train_set = with_precomputed_reference(cfg, model, instantiate(cfg.dataset, tokenizer), "dataset", device,
                                           adapters_off=True)
    val_set = with_precomputed_reference(cfg, model, instantiate(cfg.val_dataset, tokenizer), "val_dataset",
                                         device, adapters_off=True)
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
                metrics.update(evaluate_preference(model, pair_sets, loss_cfg=cfg.loss, device=device,
                                                   max_batches=cfg.eval_max_batches,
                                                   uses_reference=needs_reference(cfg.loss)))
                metrics.update(evaluate_all(model, text_sets, device=device, max_batches=cfg.eval_max_batches))
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
