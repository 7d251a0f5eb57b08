"""The config keys the training recipes share, declared once (``tunekit.config.schema``). Each
recipe composes its ``CONFIG`` from these sections at the top of its file; ``tunekit validate``,
``tunekit run`` and the recipe's own ``parse`` check a config against it before anything runs.
docs/recipes.md explains every key."""

from __future__ import annotations

from tunekit.config.schema import Bool, Component, Components, Float, Int, List, Section, Str
from tunekit.losses.preference import F_DIVERGENCE_TYPES
from tunekit.training.device import device_problem
from tunekit.training.early_stopping import MODES
from tunekit.training.preference import LOSS_TYPES, loss_config_problem

DTYPES = ("fp32", "bf16")

# where the run writes, what it starts from, how it continues
RUN_KEYS = {
    "output_dir": Str(),
    "checkpoint_dir": Str(),
    "seed": Int(min=0),
    "device": Str(check=device_problem),
    "dtype": Str(choices=DTYPES),
    "resume": Bool(),
    "resume_from": Str(nullable=True),
}

MODEL_AND_DATA_KEYS = {
    "model": Component(),
    "tokenizer": Component(),
    "dataset": Component(),
    "val_dataset": Component(nullable=True),
    "forget_dataset": Component(nullable=True),
    # benchmark-style tasks run at every evaluation (tunekit.evaluation; docs/evaluation.md), null: none
    "eval_tasks": List(Component(), min_len=0, nullable=True),
    "shuffle": Bool(),
    "num_workers": Int(min=0),
}

# the optimizer loop, evaluation, checkpoints and logs
TRAINING_LOOP_KEYS = {
    "batch_size": Int(min=1),
    "gradient_accumulation_steps": Int(min=1),
    "epochs": Int(min=1),
    "max_steps": Int(min=1, nullable=True),
    "optimizer": Component(),
    "lr_scheduler": Component(),
    "max_grad_norm": Float(min=0, min_exclusive=True, nullable=True),
    "activation_checkpointing": Bool(),
    "compile": Bool(),
    "activation_offloading": Bool(),
    "eval_every_n_steps": Int(min=1),
    "eval_max_batches": Int(min=1, nullable=True),
    "save_every_n_steps": Int(min=1),
    "keep_last_n": Int(min=1, nullable=True),
    # overfitting practice (tunekit.training.early_stopping); metric null: off
    "keep_best": Section({"metric": Str(nullable=True), "mode": Str(choices=MODES)}),
    "early_stopping": Section({"metric": Str(nullable=True), "patience": Int(min=1), "min_delta": Float(min=0),
                               "mode": Str(choices=MODES)}),
    "log_every_n_steps": Int(min=1),
    "metric_logging": Components(),  # sinks: tunekit.training.metric_sinks
}

LORA = Section({
    "targets": List(Str()),
    "rank": Int(min=1),
    "alpha": Float(min=0, min_exclusive=True),
    "dropout": Float(min=0, max=0.999),
    "use_dora": Bool(),
    "quantize_base": Bool(),
})

# Read by the *_distributed recipes. The single-device recipes accept (and check) the section too,
# so that one config serves both recipes of a method, as the shipped configs do.
FSDP = Section({"reshard_after_forward": Bool(), "cpu_offload": Bool()},
               note="read by the distributed recipes")


def _preference_loss_section() -> Section:
    return Section({
        "loss_type": List(Str(choices=LOSS_TYPES), single_ok=True),
        "loss_weights": List(Float(), nullable=True),
        "beta": Float(min=0, min_exclusive=True),
        "label_smoothing": Float(min=0, max=0.999),
        "f_divergence_type": Str(choices=F_DIVERGENCE_TYPES),
        "f_alpha_divergence_coef": Float(),
        "discopop_tau": Float(min=0, min_exclusive=True),
        "simpo_gamma": Float(),
        "cpo_alpha": Float(min=0),
        "desirable_weight": Float(min=0, min_exclusive=True),
        "undesirable_weight": Float(min=0, min_exclusive=True),
    }, check=loss_config_problem)  # the losses' own checks (names, weights, ranges)


# The preference recipes (DPO family, SimPO/CPO/ORPO, KTO): the loss and where the reference
# log-probs come from (docs/preference.md).
PREFERENCE_KEYS = {
    "loss": _preference_loss_section(),
    "precompute_reference": Bool(),
    "reference_cache_dir": Str(),
}
