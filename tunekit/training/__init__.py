"""Plain functions the recipes call: lr schedules, metric logging, atomic step checkpoints and
resume state, the resumable sampler, activation checkpointing, HF checkpoint I/O, distributed
set-up. Import from the submodules (``tunekit.training.train_step`` ...): this
package imports nothing itself, so a recipe pays only for what it uses."""
