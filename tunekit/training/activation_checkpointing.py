"""Activation checkpointing of decoder layers: recompute each layer's forward during backward.

Uses torch's composable ``checkpoint`` (non-reentrant ``torch.utils.checkpoint`` run from module
hooks), which wraps nothing: parameter and state-dict names stay ``layers.{i}....``, so HF/PEFT
checkpoints, optimizer state and FSDP2 sharding see the same model as without checkpointing.
"""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every module of ``model.layers`` in place and return ``model``. Call before
    FSDP2 sharding and before torch.compile."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"apply_activation_checkpointing: {type(model).__name__} has no non-empty nn.ModuleList "
                         "`layers`; the model contract requires decoder layers in model.layers")
    for layer in layers:
        checkpoint(layer)
    return model
