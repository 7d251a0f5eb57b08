"""Plain functions the recipes call: losses, lr schedules, metric logging, atomic step
checkpoints and resume state, the resumable sampler, activation checkpointing, HF checkpoint
I/O and distributed set-up. Import from the submodules (``tunekit.training.losses`` ...): this
package imports nothing itself, so a recipe pays only for what it uses."""
