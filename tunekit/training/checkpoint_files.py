"""What goes into a ``step_<N>/`` folder besides the resume state, shared by every recipe: the
model in Hugging Face format and, for LoRA, the PEFT adapter in ``adapter/``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunekit.modules.peft import merged_state_dict, save_peft_adapter
from tunekit.checkpoint.hf_checkpoint import read_hf_config, save_hf_checkpoint

# The adapter has its own folder because transformers (with peft installed) loads a folder holding
# adapter_config.json as base + adapter, which would apply it twice on top of the merged weights.
ADAPTER_DIR = "adapter"


def write_hf_model(folder: Path, state_dict: dict[str, torch.Tensor], checkpoint_dir: str | Path) -> None:
    """``state_dict`` (tunekit names) as an HF model in ``folder``, with the config and tokenizer
    files of the base checkpoint ``checkpoint_dir``."""
    save_hf_checkpoint(state_dict, folder, hf_config=read_hf_config(checkpoint_dir), source_dir=checkpoint_dir)


def write_lora_model(folder: Path, model: nn.Module, checkpoint_dir: str | Path) -> None:
    """A LoRA model as the merged HF model in ``folder`` plus its PEFT adapter in
    ``folder/adapter/``. ``model`` is a plain (unsharded) LoRA model."""
    write_hf_model(folder, merged_state_dict(model), checkpoint_dir)
    save_peft_adapter(model, folder / ADAPTER_DIR, base_model_name_or_path=str(checkpoint_dir))
