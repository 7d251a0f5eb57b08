"""Parameter-efficient fine-tuning: LoRA / DoRA / QLoRA layers, PEFT-format adapters, prompt
and prefix tuning and layer freezing. torchao (NF4) is imported only when a quantized base is used."""

from tunekit.modules.peft.freezing import freeze_layers, trainable_parameters
from tunekit.modules.peft.lora import (
    LoRALinear,
    adapters_disabled,
    apply_lora,
    lora_modules,
    lora_scaling,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    reset_lora_parameters,
)
from tunekit.modules.peft.peft_adapter import load_peft_adapter, read_peft_config, save_peft_adapter
from tunekit.modules.peft.prefix_tuning import (
    PrefixKV,
    PrefixTuning,
    load_peft_prefix_adapter,
    prefix_modules,
    prefix_state_dict,
    read_peft_prefix_config,
    save_peft_prefix_adapter,
)
from tunekit.modules.peft.prompt_tuning import PromptEmbedding, PromptTuning, extend_mask_with_prefix

__all__ = [
    "LoRALinear",
    "PrefixKV",
    "PrefixTuning",
    "PromptEmbedding",
    "PromptTuning",
    "adapters_disabled",
    "apply_lora",
    "extend_mask_with_prefix",
    "freeze_layers",
    "load_peft_adapter",
    "load_peft_prefix_adapter",
    "lora_modules",
    "lora_scaling",
    "lora_state_dict",
    "merge_lora",
    "merged_state_dict",
    "prefix_modules",
    "prefix_state_dict",
    "read_peft_config",
    "read_peft_prefix_config",
    "reset_lora_parameters",
    "save_peft_adapter",
    "save_peft_prefix_adapter",
    "trainable_parameters",
]
