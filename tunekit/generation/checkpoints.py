"""Which weights an inference recipe loads: an HF folder or a training run's newest step folder,
optionally with a PEFT adapter on top."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tunekit.config import instantiate
from tunekit.config.errors import ConfigError
from tunekit.modules.peft import load_peft_adapter, merge_lora
from tunekit.checkpoint.step_folders import find_model_dir


def apply_adapter(model: nn.Module, adapter_dir: str | os.PathLike, model_dir: str | os.PathLike) -> nn.Module:
    """Load the PEFT adapter in ``adapter_dir`` into ``model`` (loaded from ``model_dir``) and merge
    it into the weights, so generation costs what the base model costs. In place; returns ``model``.

    Refuses the ``adapter/`` folder of a training step checkpoint used on that same checkpoint:
    its weights already include the adapter (merged), applying it again would count it twice.
    """
    adapter, model_path = Path(adapter_dir).resolve(), Path(model_dir).resolve()
    if adapter.is_relative_to(model_path):
        raise ConfigError(f"adapter_dir={adapter_dir} lies inside the checkpoint {model_dir}, whose weights already "
                         "include this adapter (merged); set adapter_dir=null, or point checkpoint_dir at the base model")
    load_peft_adapter(model, adapter)
    return merge_lora(model)


def load_inference_model(cfg, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model an inference recipe's config names, in eval mode: ``cfg.model`` built from
    :func:`find_model_dir` of ``cfg.checkpoint_dir`` (which is set to that folder, so the model and
    tokenizer nodes interpolating ``${checkpoint_dir}`` follow), plus ``cfg.adapter_dir`` merged."""
    model_dir = find_model_dir(cfg.checkpoint_dir)
    cfg.checkpoint_dir = str(model_dir)
    model = instantiate(cfg.model, dtype=dtype, device=device)
    if cfg.adapter_dir is not None:
        apply_adapter(model, cfg.adapter_dir, model_dir)
    return model.eval()
