"""Qwen2 / Qwen2.5: the ``qwen2`` component builder and size builders."""

from tunekit.models.qwen2.builders import (
    qwen2,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_3b,
    qwen2_5_7b,
    qwen2_5_14b,
    qwen2_0_5b,
    qwen2_1_5b,
    qwen2_7b,
)

__all__ = ["qwen2", "qwen2_0_5b", "qwen2_1_5b", "qwen2_7b", "qwen2_5_0_5b", "qwen2_5_1_5b", "qwen2_5_3b",
           "qwen2_5_7b", "qwen2_5_14b"]
