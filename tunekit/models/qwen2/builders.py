"""Qwen2 / Qwen2.5 builders: biases on q/k/v (not on the output projection)."""

from __future__ import annotations

from collections.abc import Sequence

from tunekit.models.decoder_lm import decoder_lm
from tunekit.modules import TransformerDecoder


def qwen2(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
          intermediate_dim: int, max_seq_len: int, head_dim: int | None = None, norm_eps: float = 1e-6,
          rope_base: float = 1_000_000.0, rope_scaling: dict | None = None, tie_word_embeddings: bool = False,
          sliding_window: int | Sequence[int | None] | None = None, activation: str = "silu") -> TransformerDecoder:
    return decoder_lm(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
                      head_dim=head_dim, norm_eps=norm_eps, rope_base=rope_base, rope_scaling=rope_scaling,
                      qkv_bias=True, tie_word_embeddings=tie_word_embeddings, sliding_window=sliding_window,
                      activation=activation)


def qwen2_0_5b(max_seq_len: int = 32_768) -> TransformerDecoder:
    return qwen2(vocab_size=151_936, num_layers=24, num_heads=14, num_kv_heads=2, embed_dim=896, intermediate_dim=4864, max_seq_len=max_seq_len, tie_word_embeddings=True)


def qwen2_1_5b(max_seq_len: int = 32_768) -> TransformerDecoder:
    return qwen2(vocab_size=151_936, num_layers=28, num_heads=12, num_kv_heads=2, embed_dim=1536, intermediate_dim=8960, max_seq_len=max_seq_len, tie_word_embeddings=True)


def qwen2_7b(max_seq_len: int = 32_768) -> TransformerDecoder:
    return qwen2(vocab_size=152_064, num_layers=28, num_heads=28, num_kv_heads=4, embed_dim=3584, intermediate_dim=18944, max_seq_len=max_seq_len)


def qwen2_5_0_5b(max_seq_len: int = 32_768) -> TransformerDecoder:
    return qwen2_0_5b(max_seq_len)


def qwen2_5_1_5b(max_seq_len: int = 32_768) -> TransformerDecoder:
    return qwen2_1_5b(max_seq_len)


def qwen2_5_3b(max_seq_len: int = 32_768) -> TransformerDecoder:
    return qwen2(vocab_size=151_936, num_layers=36, num_heads=16, num_kv_heads=2, embed_dim=2048, intermediate_dim=11008, max_seq_len=max_seq_len, tie_word_embeddings=True)


def qwen2_5_7b(max_seq_len: int = 32_768) -> TransformerDecoder:
    return qwen2_7b(max_seq_len)


def qwen2_5_14b(max_seq_len: int = 32_768) -> TransformerDecoder:
    return qwen2(vocab_size=152_064, num_layers=48, num_heads=40, num_kv_heads=8, embed_dim=5120, intermediate_dim=13824, max_seq_len=max_seq_len)
