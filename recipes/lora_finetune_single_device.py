"""LoRA, DoRA and QLoRA fine-tuning on one device (CPU or one accelerator).

    tunekit run lora_finetune_single_device --config tiny/lora
    tunekit run lora_finetune_single_device --config llama3_2/1B_lora lora.use_dora=true
    tunekit run lora_finetune_single_device --config llama3_1/8B_qlora resume=true

The base weights are frozen (stored as NF4 with ``lora.quantize_base: true``); only the adapters
train. Every ``save_every_n_steps`` steps (and at the end, or on Ctrl-C) the recipe writes
``<output_dir>/step_<N>/``: the merged model in Hugging Face format, ``adapter/`` in PEFT format
and ``recipe_state/`` for ``resume=true``. docs/recipes.md explains every config key.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from torch import nn

import tunekit.config
from tunekit.checkpoint.step_folders import load_recipe_state, save_recipe_state
from tunekit.config import instantiate
from tunekit.models.vocabulary import check_tokenizer_fits
from tunekit.modules.peft import load_peft_adapter
from tunekit.training.activation_checkpointing import apply_activation_checkpointing
from tunekit.training.activation_offloading import offload_activations
from tunekit.training.checkpoint_files import ADAPTER_DIR, write_lora_model
from tunekit.training.cpu_allocator import keep_freed_cpu_memory
from tunekit.training.data_loaders import batches_per_epoch, count_training_steps, training_loader
from tunekit.training.device import get_device, get_dtype
from tunekit.training.early_stopping import ValidationWatch
from tunekit.training.evaluation import build_eval_loaders, evaluate_all
from tunekit.training.interrupt import stop_on_interrupt
from tunekit.training.metric_logging import MetricLogger
from tunekit.training.recipe_config import FSDP, LORA, MODEL_AND_DATA_KEYS, RUN_KEYS, TRAINING_LOOP_KEYS
from tunekit.training.recipe_models import build_lora_model
from tunekit.training.resume import restore_training_state, resume_dir_of, training_state
from tunekit.training.rng import set_seed
from tunekit.training.step_checkpoints import save_step_checkpoint
from tunekit.training.train_step import (
    check_finite_step,
    clip_gradients,
    label_token_count,
    move_batch,
    step_metrics,
    step_started,
    training_steps,
)

log = logging.getLogger("tunekit.recipes.lora_finetune_single_device")

# Every key this recipe reads; `tunekit validate` checks a config against it (docs/recipes.md).
CONFIG = {**RUN_KEYS, **MODEL_AND_DATA_KEYS, "lora": LORA, **TRAINING_LOOP_KEYS, "fsdp": FSDP}


def build_model(cfg, device: torch.device, dtype: torch.dtype, resume_dir: Path | None) -> nn.Module:
    """Base model from ``cfg.model`` with LoRA adapters (from ``resume_dir`` when resuming)."""
    model = build_lora_model(cfg.model, cfg.lora, dtype=dtype, device=device)
    if resume_dir is not None:
        load_peft_adapter(model, resume_dir / ADAPTER_DIR)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        for layer in model.layers:  # per layer: compiles once, reused by every layer of the same shape
            layer.compile()
    return model


def train_step(cfg, model: nn.Module, micro_batches: list, *, trainable: list, optimizer, lr_scheduler,
               device: torch.device, step: int, epoch: int) -> dict:
    """One optimizer step: forward + summed token loss and backward for each micro-batch (the loss
    divided by the step's labelled tokens, so the gradients add up to the mean over all of them),
    clip, stop if anything is non-finite, update the adapters and the lr. Returns the step's metrics."""
    started = step_started(device)
    num_tokens = label_token_count(micro_batches)
    loss = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = move_batch(batch, device)
        with offload_activations(device, enabled=cfg.activation_offloading):
            micro_loss = model(batch["tokens"], labels=batch["labels"], mask=batch.get("mask"),
                               input_pos=batch.get("input_pos")) / num_tokens
        micro_loss.backward()
        loss += micro_loss.detach()
    grad_norm = clip_gradients(trainable, cfg.max_grad_norm)
    check_finite_step(step, loss=loss.item(), grad_norm=grad_norm, model=model, output_dir=cfg.output_dir)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = lr_scheduler.get_last_lr()[0]
    lr_scheduler.step()
    return step_metrics(started, micro_batches, loss=loss.item(), lr=lr, grad_norm=grad_norm, epoch=epoch,
                        device=device)


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
    resume_dir = resume_dir_of(cfg.output_dir, resume=cfg.resume, resume_from=cfg.resume_from)
    set_seed(cfg.seed)

    model = build_model(cfg, device, dtype, resume_dir)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log.info(f"trainable parameters: {sum(p.numel() for p in trainable):,} of "
             f"{sum(p.numel() for p in model.parameters()):,}")

    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer, model, model_source=cfg.checkpoint_dir)
    train_set = instantiate(cfg.dataset, tokenizer)
    loader, sampler = training_loader(train_set, batch_size=cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed,
                                      num_workers=cfg.num_workers)
    eval_sets = build_eval_loaders({"val_loss": cfg.val_dataset, "forget_loss": cfg.forget_dataset}, tokenizer,
                                   batch_size=cfg.batch_size, num_workers=cfg.num_workers, tasks=cfg.eval_tasks)

    watch = ValidationWatch(cfg.keep_best, cfg.early_stopping, evaluated=eval_sets)  # checks keep_best / early_stopping
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
                metrics.update(evaluate_all(model, eval_sets, device=device, max_batches=cfg.eval_max_batches))
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
