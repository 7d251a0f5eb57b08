"""Mistral: the ``mistral`` component builder and size builders."""

from tunekit.models.mistral.builders import mistral, mistral_7b, mistral_7b_v0_3

__all__ = ["mistral", "mistral_7b", "mistral_7b_v0_3"]
