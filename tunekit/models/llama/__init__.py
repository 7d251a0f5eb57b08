"""Llama 2 and Llama 3.x: the ``llama`` component builder and one-line size builders."""

from tunekit.models.llama.builders import (
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

__all__ = ["llama", "llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "llama3_70b", "llama3_1_8b",
           "llama3_1_70b", "llama3_2_1b", "llama3_2_3b", "llama3_3_70b"]
