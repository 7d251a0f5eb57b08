"""On-disk formats, at the bottom of tunekit's package stack (only ``tunekit.config`` below it):
Hugging Face model folders (``config.json`` + safetensors, HF parameter names), PEFT adapter
folders, and training runs' ``step_<N>/`` folders. Nothing here knows about models or training
loops; ``models``, ``modules`` and ``training`` import from here, never the other way round.

Import from the submodules (``tunekit.checkpoint.hf_checkpoint`` ...); the error types are
re-exported here.
"""

from tunekit.checkpoint.errors import CheckpointError, NonFiniteError, check_finite

__all__ = ["CheckpointError", "NonFiniteError", "check_finite"]
