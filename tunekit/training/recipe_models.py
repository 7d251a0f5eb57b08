"""The models of the recipes, shared by the single-device and the distributed recipes: the LoRA /
DoRA / QLoRA model of a config (same adapters, same random initialisation, same NF4 bases in
every recipe) and the weightless meta-device twins that the ranks other than 0 start from."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunekit.config import instantiate
from tunekit.models import build_from_hf_config
from tunekit.modules.peft import apply_lora, lora_modules
from tunekit.checkpoint.hf_checkpoint import read_hf_config


def add_lora(model: nn.Module, lora, *, quantize_base: bool | None = None) -> nn.Module:
    """``apply_lora`` with the settings of the config's ``lora`` section (``targets``, ``rank``,
    ``alpha``, ``dropout``, ``use_dora``, ``quantize_base``); ``quantize_base`` overrides the
    config (the distributed recipes quantize later, unit by unit)."""
    quantize = lora.quantize_base if quantize_base is None else quantize_base
    return apply_lora(model, list(lora.targets), rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                      use_dora=lora.use_dora, quantize_base=quantize)


def build_lora_model(model_node, lora, *, dtype: torch.dtype, device: torch.device | str,
                     quantize_base: bool | None = None) -> nn.Module:
    """The config's base model (``model`` section, weights in ``dtype`` on ``device``) with
    adapters from its ``lora`` section; the adapters draw their initial values from torch's
    global RNG, so a given seed gives the same adapters in every recipe."""
    return add_lora(instantiate(model_node, dtype=dtype, device=device), lora, quantize_base=quantize_base)


def base_architecture(checkpoint_dir: str | Path, *, dtype: torch.dtype) -> nn.Module:
    """The model of the HF checkpoint ``checkpoint_dir`` on the meta device (no weights, no
    memory) with parameters in ``dtype``: what ``from_hf(checkpoint_dir, dtype=dtype)`` builds."""
    return build_from_hf_config(read_hf_config(checkpoint_dir), device="meta", source=checkpoint_dir).to(dtype)


def lora_architecture(checkpoint_dir: str | Path, lora, *, dtype: torch.dtype) -> nn.Module:
    """The same LoRA model as ``build_lora_model`` on the meta device, unquantized."""
    return add_lora(base_architecture(checkpoint_dir, dtype=dtype), lora, quantize_base=False)


def quantize_lora_bases(module: nn.Module) -> None:
    """Store the frozen base weight of every LoRA layer in ``module`` as NF4 (QLoRA), exactly as
    ``apply_lora(..., quantize_base=True)`` would; DoRA magnitudes are re-initialised from the
    quantized base as there."""
    from tunekit.modules.peft.nf4 import to_nf4

    for layer in lora_modules(module).values():
        if layer.quantized:
            continue
        layer.weight = nn.Parameter(to_nf4(layer.weight.data), requires_grad=False)
        layer.quantized = True
        if layer.use_dora:
            with torch.no_grad():
                layer.magnitude.copy_(layer._row_norm(layer.base_weight(torch.float32), None))


def lora_model_from_state_dict(checkpoint_dir: str | Path, lora, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A plain (CPU, unsharded, unquantized) LoRA model holding ``state_dict`` (e.g. gathered from
    a sharded model; NF4 bases are dequantized): what the checkpoint writers take."""
    from tunekit.modules.peft.nf4 import is_nf4, nf4_dequantize

    state = {k: nf4_dequantize(v) if is_nf4(v) else v for k, v in state_dict.items()}
    dtype = next(v.dtype for k, v in state.items() if k.endswith(".weight") and ".lora_" not in k)
    model = lora_architecture(checkpoint_dir, lora, dtype=dtype)
    model.load_state_dict(state, assign=True)
    return model
