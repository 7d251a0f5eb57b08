"""Build a tunekit model from an HF ``config.json`` and load an HF checkpoint folder into it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunekit.models.hf_config import builder_args_from_hf_config
from tunekit.modules import TransformerDecoder, reset_rope_buffers
from tunekit.training.checkpoint_hf import load_hf_state_dict, read_hf_config


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model built from its config."""


def build_from_hf_config(hf_config: dict, *, device: torch.device | str = "meta") -> TransformerDecoder:
    """The architecture ``hf_config`` describes, without weights (``device="meta"`` allocates nothing).

    On a real device, parameters get PyTorch's default init and rotary tables are valid.
    """
    builder, kwargs = builder_args_from_hf_config(hf_config)
    with torch.device(device):
        return builder(**kwargs)


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` listing missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    problems = []
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    for key in sorted(expected.keys() & state_dict.keys()):
        if expected[key].shape != state_dict[key].shape:
            problems.append(f"{key}: checkpoint shape {tuple(state_dict[key].shape)} != model shape "
                            f"{tuple(expected[key].shape)}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not match the model: " + "; ".join(problems))


def from_hf(checkpoint_dir: str | Path, *, dtype: torch.dtype | None = None,
            device: torch.device | str = "cpu") -> TransformerDecoder:
    """Load an HF checkpoint folder (``config.json`` + safetensors) as a tunekit model.

    Memory-lean: the model is built on the meta device and the loaded tensors are assigned to it,
    so weights are held once. ``dtype`` casts floating-point weights (None keeps the stored dtype).
    """
    config = read_hf_config(checkpoint_dir)
    model = build_from_hf_config(config, device="meta")
    state_dict = load_hf_state_dict(checkpoint_dir, dtype=dtype)
    if model.tied:
        # some tied checkpoints also store lm_head.weight (a copy of the embedding)
        state_dict.pop("output.weight", None)
    check_state_dict(model, state_dict, source=str(checkpoint_dir))
    model.load_state_dict(state_dict, assign=True)
    reset_rope_buffers(model, device="cpu")
    return model.to(device)
