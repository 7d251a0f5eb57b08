"""Build a tunekit model from an HF ``config.json`` and load an HF checkpoint folder into it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunekit.models.hf_config import UnsupportedConfigError, builder_args_from_hf_config
from tunekit.modules import TransformerDecoder, reset_rope_buffers
from tunekit.checkpoint.errors import CheckpointError
from tunekit.checkpoint.hf_checkpoint import load_hf_state_dict, read_hf_config


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model built from its config."""


def build_from_hf_config(hf_config: dict, *, device: torch.device | str = "meta",
                         source: str | Path | None = None) -> TransformerDecoder:
    """The architecture ``hf_config`` describes, without weights (``device="meta"`` allocates nothing).

    On a real device, parameters get PyTorch's default init and rotary tables are valid.
    ``source`` (the checkpoint folder) is named in the error when a field is not supported.
    """
    try:
        builder, kwargs = builder_args_from_hf_config(hf_config)
    except UnsupportedConfigError as e:
        if source is None:
            raise
        raise UnsupportedConfigError(str(e).replace("config.json:", f"{Path(source) / 'config.json'}:", 1)) from None
    with torch.device(device):
        return builder(**kwargs)


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` listing missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    problems = []
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    for key in sorted(expected.keys() & state_dict.keys()):
        if expected[key].shape != state_dict[key].shape:
            problems.append(f"{key}: checkpoint shape {tuple(state_dict[key].shape)} != model shape "
                            f"{tuple(expected[key].shape)}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not match the model its config.json describes: "
                                      + "; ".join(problems[:6]) + ("; ..." if len(problems) > 6 else "")
                                      + "; the weights and config.json come from different models, or a file is "
                                      "missing")


def _few(names: list[str], n: int = 4) -> str:
    return str(names[:n])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > n else "]")


def from_hf(checkpoint_dir: str | Path, *, dtype: torch.dtype | None = None,
            device: torch.device | str = "cpu") -> TransformerDecoder:
    """Load an HF checkpoint folder (``config.json`` + safetensors) as a tunekit model.

    Memory-lean: the model is built on the meta device and the loaded tensors are assigned to it,
    so weights are held once. ``dtype`` casts floating-point weights (None keeps the stored dtype).
    """
    config = read_hf_config(checkpoint_dir)
    model = build_from_hf_config(config, device="meta", source=checkpoint_dir)
    state_dict = load_hf_state_dict(checkpoint_dir, dtype=dtype)
    if model.tied:
        # some tied checkpoints also store lm_head.weight (a copy of the embedding)
        state_dict.pop("output.weight", None)
    check_state_dict(model, state_dict, source=str(checkpoint_dir))
    model.load_state_dict(state_dict, assign=True)
    reset_rope_buffers(model, device="cpu")
    return model.to(device)
