"""Model builders per family, the shared ``decoder_lm`` builder, and HF checkpoint loading."""

from tunekit.models.decoder_lm import decoder_lm
from tunekit.models.from_hf import CheckpointMismatchError, build_from_hf_config, check_state_dict, from_hf
from tunekit.models.hf_config import UnsupportedConfigError
from tunekit.models.llama import (
    llama,
    llama2_7b,
    llama2_13b,
    llama2_70b,
    llama3_1_8b,
    llama3_1_70b,
    llama3_2_1b,
    llama3_2_3b,
    llama3_3_70b,
    llama3_8b,
    llama3_70b,
)
from tunekit.models.mistral import mistral, mistral_7b, mistral_7b_v0_3
from tunekit.models.qwen2 import (
    qwen2,
    qwen2_0_5b,
    qwen2_1_5b,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_3b,
    qwen2_5_7b,
    qwen2_5_14b,
    qwen2_7b,
)
from tunekit.models.qwen3 import qwen3, qwen3_0_6b, qwen3_1_7b, qwen3_4b, qwen3_8b, qwen3_14b

__all__ = [
    "CheckpointMismatchError", "UnsupportedConfigError", "build_from_hf_config", "check_state_dict", "decoder_lm",
    "from_hf", "llama", "llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "llama3_70b", "llama3_1_8b",
    "llama3_1_70b", "llama3_2_1b", "llama3_2_3b", "llama3_3_70b", "mistral", "mistral_7b", "mistral_7b_v0_3",
    "qwen2", "qwen2_0_5b", "qwen2_1_5b", "qwen2_7b", "qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_3b", "qwen2_5_7b",
    "qwen2_5_14b", "qwen3", "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b",
]
