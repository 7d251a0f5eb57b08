"""Qwen3 dense builders: RMSNorm on each query/key head, explicit ``head_dim`` (128)."""

from __future__ import annotations

from collections.abc import Sequence

from tunekit.models.decoder_lm import decoder_lm
from tunekit.modules import TransformerDecoder


def qwen3(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
          intermediate_dim: int, max_seq_len: int, head_dim: int = 128, norm_eps: float = 1e-6,
          rope_base: float = 1_000_000.0, rope_scaling: dict | None = None, tie_word_embeddings: bool = False,
          attention_bias: bool = False, sliding_window: int | Sequence[int | None] | None = None,
          activation: str = "silu") -> TransformerDecoder:
    return decoder_lm(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
                      head_dim=head_dim, norm_eps=norm_eps, rope_base=rope_base, rope_scaling=rope_scaling,
                      qkv_bias=attention_bias, output_proj_bias=attention_bias, qk_norm=True,
                      tie_word_embeddings=tie_word_embeddings, sliding_window=sliding_window, activation=activation)


def qwen3_0_6b(max_seq_len: int = 40_960) -> TransformerDecoder:
    return qwen3(vocab_size=151_936, num_layers=28, num_heads=16, num_kv_heads=8, embed_dim=1024, intermediate_dim=3072, max_seq_len=max_seq_len, tie_word_embeddings=True)


def qwen3_1_7b(max_seq_len: int = 40_960) -> TransformerDecoder:
    return qwen3(vocab_size=151_936, num_layers=28, num_heads=16, num_kv_heads=8, embed_dim=2048, intermediate_dim=6144, max_seq_len=max_seq_len, tie_word_embeddings=True)


def qwen3_4b(max_seq_len: int = 40_960) -> TransformerDecoder:
    return qwen3(vocab_size=151_936, num_layers=36, num_heads=32, num_kv_heads=8, embed_dim=2560, intermediate_dim=9728, max_seq_len=max_seq_len, tie_word_embeddings=True)


def qwen3_8b(max_seq_len: int = 40_960) -> TransformerDecoder:
    return qwen3(vocab_size=151_936, num_layers=36, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=12288, max_seq_len=max_seq_len)


def qwen3_14b(max_seq_len: int = 40_960) -> TransformerDecoder:
    return qwen3(vocab_size=151_936, num_layers=40, num_heads=40, num_kv_heads=8, embed_dim=5120, intermediate_dim=17408, max_seq_len=max_seq_len)
