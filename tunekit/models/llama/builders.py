"""Llama 2 / 3 / 3.1 / 3.2 / 3.3 builders (sizes from the official HF ``config.json`` files)."""

from __future__ import annotations

from tunekit.models.decoder_lm import decoder_lm
from tunekit.modules import TransformerDecoder

# Llama 3.1+ frequency scaling; 3.2's small models use factor 32
LLAMA3_1_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}
LLAMA3_2_ROPE = {**LLAMA3_1_ROPE, "factor": 32.0}


def llama(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
          intermediate_dim: int, max_seq_len: int, head_dim: int | None = None, norm_eps: float = 1e-5,
          rope_base: float = 500_000.0, rope_scaling: dict | None = None, tie_word_embeddings: bool = False,
          attention_bias: bool = False, mlp_bias: bool = False, activation: str = "silu") -> TransformerDecoder:
    """Llama decoder; ``attention_bias`` puts biases on q/k/v *and* the output projection, as HF does."""
    return decoder_lm(vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len,
                      head_dim=head_dim, norm_eps=norm_eps, rope_base=rope_base, rope_scaling=rope_scaling,
                      qkv_bias=attention_bias, output_proj_bias=attention_bias, mlp_bias=mlp_bias,
                      tie_word_embeddings=tie_word_embeddings, activation=activation)


def _llama2(**kw) -> TransformerDecoder:
    return llama(vocab_size=32_000, rope_base=10_000.0, **kw)


def _llama3(**kw) -> TransformerDecoder:
    return llama(vocab_size=128_256, rope_base=500_000.0, **kw)


def llama2_7b(max_seq_len: int = 4096) -> TransformerDecoder:
    return _llama2(num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096, intermediate_dim=11008, max_seq_len=max_seq_len)


def llama2_13b(max_seq_len: int = 4096) -> TransformerDecoder:
    return _llama2(num_layers=40, num_heads=40, num_kv_heads=40, embed_dim=5120, intermediate_dim=13824, max_seq_len=max_seq_len)


def llama2_70b(max_seq_len: int = 4096) -> TransformerDecoder:
    return _llama2(num_layers=80, num_heads=64, num_kv_heads=8, embed_dim=8192, intermediate_dim=28672, max_seq_len=max_seq_len)


def llama3_8b(max_seq_len: int = 8192) -> TransformerDecoder:
    return _llama3(num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14336, max_seq_len=max_seq_len)


def llama3_70b(max_seq_len: int = 8192) -> TransformerDecoder:
    return _llama3(num_layers=80, num_heads=64, num_kv_heads=8, embed_dim=8192, intermediate_dim=28672, max_seq_len=max_seq_len)


def llama3_1_8b(max_seq_len: int = 131_072) -> TransformerDecoder:
    return _llama3(num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14336, max_seq_len=max_seq_len, rope_scaling=LLAMA3_1_ROPE)


def llama3_1_70b(max_seq_len: int = 131_072) -> TransformerDecoder:
    return _llama3(num_layers=80, num_heads=64, num_kv_heads=8, embed_dim=8192, intermediate_dim=28672, max_seq_len=max_seq_len, rope_scaling=LLAMA3_1_ROPE)


def llama3_2_1b(max_seq_len: int = 131_072) -> TransformerDecoder:
    return _llama3(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192, head_dim=64, max_seq_len=max_seq_len, rope_scaling=LLAMA3_2_ROPE, tie_word_embeddings=True)


def llama3_2_3b(max_seq_len: int = 131_072) -> TransformerDecoder:
    return _llama3(num_layers=28, num_heads=24, num_kv_heads=8, embed_dim=3072, intermediate_dim=8192, head_dim=128, max_seq_len=max_seq_len, rope_scaling=LLAMA3_2_ROPE, tie_word_embeddings=True)


def llama3_3_70b(max_seq_len: int = 131_072) -> TransformerDecoder:
    return llama3_1_70b(max_seq_len)
