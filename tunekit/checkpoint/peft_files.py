"""Hugging Face PEFT adapter folders on disk: ``adapter_config.json`` + ``adapter_model.safetensors``
(keys ``base_model.model.<HF module path>.<PEFT suffix>``). What the tensors mean for each PEFT
method lives with the method (``tunekit.modules.peft``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunekit.checkpoint.errors import CheckpointError, check_finite
from tunekit.checkpoint.hf_checkpoint import read_json_file
from tunekit.config.errors import MissingFileError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's prefix of every adapter tensor key


def write_adapter_folder(out_dir: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``
    (refused, nothing written, if a tensor holds NaN or infinity)."""
    out = Path(out_dir)
    check_finite(tensors.items(), str(out), action="saving")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter_folder_config(adapter_dir: str | os.PathLike) -> dict:
    """The raw ``adapter_config.json`` of a PEFT adapter folder (any peft_type, not validated)."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} not found: {adapter_dir} is not a PEFT adapter folder")
    return read_json_file(path, "adapter config")


def read_adapter_folder_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` (PEFT key names); NaN/inf values are refused."""
    path = Path(adapter_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise MissingFileError(f"{path} not found (tunekit reads only safetensors adapters)")
    try:
        tensors = load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt: "
                              "copy it again") from None
    check_finite(tensors.items(), str(path), action="loading")
    return tensors
