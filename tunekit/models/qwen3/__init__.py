"""Qwen3 (dense): the ``qwen3`` component builder and size builders."""

from tunekit.models.qwen3.builders import qwen3, qwen3_0_6b, qwen3_1_7b, qwen3_4b, qwen3_8b, qwen3_14b

__all__ = ["qwen3", "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b"]
