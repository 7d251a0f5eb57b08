"""Preference tuning with LoRA / DoRA / QLoRA on one device: DPO and its family, SimPO / CPO /
ORPO, and KTO, chosen by ``loss.loss_type``.

    tunekit run lora_dpo_single_device --config tiny/dpo
    tunekit run lora_dpo_single_device --config tiny/dpo loss.loss_type=[sigmoid,sft]   # RPO
    tunekit run lora_dpo_single_device --config tiny/orpo
    tunekit run lora_dpo_single_device --config tiny/kto
    tunekit run lora_dpo_single_device --config llama3_2/1B_lora_dpo precompute_reference=true

The reference model is the base itself: the LoRA adapters are switched off for the reference
forward (no second copy of the weights); with ``precompute_reference: true`` its log-probs are
computed once before training and cached on disk, so training runs the policy alone. Each step runs
chosen and rejected completions in one forward (``dataset.packed: true``: several pairs per row,
the prompt computed once for both), sums the completions' token log-probs with the output
projection fused (no [batch, seq, vocab] logits) and applies the configured loss. Checkpoints,
resume, Ctrl-C, the non-finite guard and the logs are those of the SFT recipes; the metrics carry
TRL's names (``rewards/accuracies``, ...). docs/preference.md explains every key.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from torch import nn

import tunekit.config
from tunekit.checkpoint.step_folders import find_model_dir, load_recipe_state, save_recipe_state
from tunekit.config import instantiate
from tunekit.models.vocabulary import check_tokenizer_fits
from tunekit.modules.peft import load_peft_adapter
from tunekit.training.activation_checkpointing import apply_activation_checkpointing
from tunekit.training.activation_offloading import offload_activations
from tunekit.training.checkpoint_files import ADAPTER_DIR, write_lora_model
from tunekit.training.cpu_allocator import keep_freed_cpu_memory
from tunekit.training.data_loaders import batches_per_epoch, count_training_steps, eval_loader, training_loader
from tunekit.training.device import get_device, get_dtype
from tunekit.training.early_stopping import ValidationWatch
from tunekit.training.evaluation import build_eval_loaders, evaluate_all
from tunekit.training.interrupt import stop_on_interrupt
from tunekit.training.metric_logging import MetricLogger
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
from tunekit.training.recipe_config import (
    FSDP,
    LORA,
    MODEL_AND_DATA_KEYS,
    PREFERENCE_KEYS,
    RUN_KEYS,
    TRAINING_LOOP_KEYS,
)
from tunekit.training.recipe_models import build_lora_model
from tunekit.training.resume import restore_training_state, resume_dir_of, training_state
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

log = logging.getLogger("tunekit.recipes.lora_dpo_single_device")

# Every key this recipe reads; `tunekit validate` checks a config against it (docs/preference.md).
CONFIG = {**RUN_KEYS, **MODEL_AND_DATA_KEYS, "lora": LORA, **PREFERENCE_KEYS, **TRAINING_LOOP_KEYS, "fsdp": FSDP}


def build_model(cfg, device: torch.device, dtype: torch.dtype, resume_dir: Path | None) -> nn.Module:
    """Base model from ``cfg.model`` with LoRA adapters (from ``resume_dir`` when resuming)."""
    model = build_lora_model(cfg.model, cfg.lora, dtype=dtype, device=device)
    if resume_dir is not None:
        load_peft_adapter(model, resume_dir / ADAPTER_DIR)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        for layer in model.layers:
            layer.compile()
    return model


def train_step(cfg, model: nn.Module, micro_batches: list, *, trainable: list, optimizer, lr_scheduler,
               device: torch.device, step: int, epoch: int) -> dict:
    """One optimizer step: for each micro-batch the reference log-probs (adapters off, no
    gradient; or precomputed), the policy's log-probs of chosen and rejected in one forward, the
    loss of every pair summed and divided by the step's pairs (so the gradients add up to the mean
    over all of them) and backward; clip, stop if anything is non-finite, update the adapters and
    the lr. Returns the step's metrics."""
    started = step_started(device)
    num_pairs = sum(int(b["num_pairs"]) for b in micro_batches)
    nll_tokens = mean_chosen_tokens(micro_batches)
    metrics = PreferenceMetrics()
    for batch in micro_batches:
        batch = move_batch(batch, device)
        reference = reference_logps(batch, policy=model) if needs_reference(cfg.loss) else None
        with offload_activations(device, enabled=cfg.activation_offloading):
            policy = sequence_logps(model, batch)
            objective = preference_objective(cfg.loss, batch, policy, reference, mean_chosen_tokens=nll_tokens)
            loss = objective.losses.sum() / num_pairs
        loss.backward()
        metrics.add(objective, policy, batch)
    grad_norm = clip_gradients(trainable, cfg.max_grad_norm)
    results = metrics.means()
    check_finite_step(step, loss=results["loss"], grad_norm=grad_norm, model=model, output_dir=cfg.output_dir)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = lr_scheduler.get_last_lr()[0]
    lr_scheduler.step()
    return {**results, **step_metrics(started, micro_batches, loss=results["loss"], lr=lr, grad_norm=grad_norm,
                                      epoch=epoch, device=device)}


def save_checkpoint(cfg, model: nn.Module, step: int, state: dict, best: dict | None = None) -> Path:
    """``step_<N>/``: merged HF model, PEFT adapter in ``adapter/`` and resume state, written atomically."""

    def write(folder: Path) -> None:
        write_lora_model(folder, model, cfg.checkpoint_dir)
        save_recipe_state(folder, state)

    path = save_step_checkpoint(cfg.output_dir, step, write, keep_last_n=cfg.keep_last_n, best=best)
    log.info(f"saved {path}")
    return path


def main(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = get_device(cfg.device)
    if device.type == "cpu":
        keep_freed_cpu_memory()  # reuse freed activations instead of page-faulting fresh ones each step
    dtype = get_dtype(cfg.dtype, device)
    cfg.checkpoint_dir = str(find_model_dir(cfg.checkpoint_dir))  # an HF folder, or an SFT run's newest step_<N>/
    check_batch_fits_loss(cfg.loss, cfg.batch_size)
    resume_dir = resume_dir_of(cfg.output_dir, resume=cfg.resume, resume_from=cfg.resume_from)
    set_seed(cfg.seed)

    model = build_model(cfg, device, dtype, resume_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info(f"trainable parameters: {sum(p.numel() for p in trainable):,} of "
             f"{sum(p.numel() for p in model.parameters()):,}")

    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer, model, model_source=cfg.checkpoint_dir)
    # with precompute_reference: the base's log-probs (adapters off) computed once, cached on disk
    train_set = with_precomputed_reference(cfg, model, instantiate(cfg.dataset, tokenizer), "dataset", device,
                                           adapters_off=True)
    val_set = with_precomputed_reference(cfg, model, instantiate(cfg.val_dataset, tokenizer), "val_dataset",
                                         device, adapters_off=True)
    loader, sampler = training_loader(train_set, batch_size=cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed,
                                      num_workers=cfg.num_workers)
    pair_sets = {} if val_set is None else {
        "eval": eval_loader(val_set, batch_size=cfg.batch_size, num_workers=cfg.num_workers)}
    text_sets = build_eval_loaders({"forget_loss": cfg.forget_dataset}, tokenizer, batch_size=cfg.batch_size,
                                   num_workers=cfg.num_workers, tasks=cfg.eval_tasks)

    # keep_best / early_stopping: the metric must be one this run evaluates (eval_loss, ..., forget_loss)
    watch = ValidationWatch(cfg.keep_best, cfg.early_stopping, evaluated=[*(f"{n}_*" for n in pair_sets), *text_sets])
    _, total_steps = count_training_steps(batches_per_epoch(loader), epochs=cfg.epochs, max_steps=cfg.max_steps,
                                          gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    optimizer = instantiate(cfg.optimizer, trainable)
    lr_scheduler = instantiate(cfg.lr_scheduler, optimizer, num_training_steps=total_steps)

    step, epoch = 0, 0
    if resume_dir is not None:
        step, epoch = restore_training_state(load_recipe_state(resume_dir), optimizer=optimizer,
                                             lr_scheduler=lr_scheduler, sampler=sampler, watch=watch)
        log.info(f"resumed from {resume_dir} at step {step}, epoch {epoch}")

    logger = MetricLogger(cfg.output_dir, cfg.metric_logging, config=cfg, total_steps=total_steps,
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
            if step % cfg.save_every_n_steps == 0 or step == total_steps or stop.is_set or decision.save:
                state = training_state(step=step, epoch=epoch, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                       sampler=sampler, consumed=consumed, watch=watch)
                save_checkpoint(cfg, model, step, state, best=watch.best_record)
            if stop.is_set or decision.stop:
                log.info(f"stopped at step {step}" + ("" if decision.stop else "; continue with resume=true"))
                return
    log.info(f"done: {step} steps, checkpoints in {cfg.output_dir}")


if __name__ == "__main__":
    with tunekit.config.user_errors():
        main(tunekit.config.parse(sys.argv[1:], CONFIG))
