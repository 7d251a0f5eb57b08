"""Mistral builders: Llama-shaped, with an optional sliding attention window on every layer."""

from __future__ import annotations

from tunekit.models.decoder_lm import decoder_lm
from tunekit.modules import TransformerDecoder


def mistral(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
            intermediate_dim: int, max_seq_len: int, head_dim: int | None = None, norm_eps: float = 1e-5,
            rope_base: float = 10_000.0, sliding_window: int | None = None, tie_word_embeddings: bool = False,
            activation: str = "silu") -> TransformerDecoder:
    return decoder_lm(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
                      head_dim=head_dim, norm_eps=norm_eps, rope_base=rope_base, sliding_window=sliding_window,
                      tie_word_embeddings=tie_word_embeddings, activation=activation)


def mistral_7b(max_seq_len: int = 32_768) -> TransformerDecoder:
    """Mistral-7B-v0.1 (4096-token sliding window)."""
    return mistral(vocab_size=32_000, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14336, max_seq_len=max_seq_len, sliding_window=4096)


def mistral_7b_v0_3(max_seq_len: int = 32_768) -> TransformerDecoder:
    """Mistral-7B-v0.3 (larger vocabulary, theta 1e6, full attention)."""
    return mistral(vocab_size=32_768, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14336, max_seq_len=max_seq_len, rope_base=1_000_000.0)
