"""The one decoder-only LM builder every family builder calls with its own defaults."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from tunekit.modules import (
    ACTIVATIONS,
    Attention,
    FeedForward,
    RMSNorm,
    RotaryEmbedding,
    TransformerDecoder,
    TransformerDecoderLayer,
)


def decoder_lm(*, vocab_size: int, num_layers: int, num_heads: int, num_kv_heads: int, embed_dim: int,
               intermediate_dim: int, max_seq_len: int, head_dim: int | None = None, norm_eps: float = 1e-5,
               rope_base: float = 10_000.0, rope_scaling: dict | None = None, partial_rotary_factor: float = 1.0,
               qkv_bias: bool = False, output_proj_bias: bool = False, mlp_bias: bool = False,
               qk_norm: bool = False, tie_word_embeddings: bool = False,
               sliding_window: int | Sequence[int | None] | None = None, activation: str = "silu",
               norm_offset: bool = False, attn_softcap: float | None = None) -> TransformerDecoder:
    """Pre-norm decoder LM with GQA, rotary embeddings and a gated MLP, built on the current device.

    Args:
        head_dim: defaults to ``embed_dim // num_heads``.
        max_seq_len: length of the rotary tables (longest sequence the model accepts).
        rope_scaling: HF-style dict (``{"rope_type": "llama3" | "linear", ...}``) or None.
        partial_rotary_factor: fraction of each head's channels that get rotary embeddings.
        qkv_bias / output_proj_bias / mlp_bias: biases on q/k/v, on the attention output and on
            the MLP projections.
        qk_norm: RMSNorm over ``head_dim`` on queries and keys before rotary (Qwen3).
        tie_word_embeddings: no ``output`` layer; logits use ``tok_embeddings.weight``.
        sliding_window: one window for all layers or one entry (int or None) per layer.
        activation: gate activation, an HF ``hidden_act`` name (see ``tunekit.modules.ACTIVATIONS``).
        norm_offset: Gemma-style ``(1 + w)`` RMSNorm weights.
        attn_softcap: tanh soft-capping of attention scores.
    """
    head_dim = head_dim or embed_dim // num_heads
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    windows = list(sliding_window) if isinstance(sliding_window, Sequence) else [sliding_window] * num_layers
    if len(windows) != num_layers:
        raise ValueError(f"sliding_window has {len(windows)} entries for {num_layers} layers")
    rotary_dim = int(head_dim * partial_rotary_factor)
    rope = RotaryEmbedding(rotary_dim, max_seq_len, rope_base, rope_scaling)  # shared by all layers

    def norm(dim: int) -> RMSNorm:
        return RMSNorm(dim, norm_eps, offset=norm_offset)

    def layer(window: int | None) -> TransformerDecoderLayer:
        attn = Attention(
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=qkv_bias),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=qkv_bias),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=qkv_bias),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=output_proj_bias),
            pos_emb=rope,
            q_norm=norm(head_dim) if qk_norm else None,
            k_norm=norm(head_dim) if qk_norm else None,
            sliding_window=window, softcap=attn_softcap,
        )
        mlp = FeedForward(w1=nn.Linear(embed_dim, intermediate_dim, bias=mlp_bias),
                          w2=nn.Linear(intermediate_dim, embed_dim, bias=mlp_bias),
                          w3=nn.Linear(embed_dim, intermediate_dim, bias=mlp_bias),
                          activation=ACTIVATIONS[activation])
        return TransformerDecoderLayer(attn=attn, mlp=mlp, sa_norm=norm(embed_dim), mlp_norm=norm(embed_dim))

    return TransformerDecoder(
        tok_embeddings=nn.Embedding(vocab_size, embed_dim),
        layers=[layer(w) for w in windows],
        norm=norm(embed_dim),
        output=None if tie_word_embeddings else nn.Linear(embed_dim, vocab_size, bias=False),
    )
