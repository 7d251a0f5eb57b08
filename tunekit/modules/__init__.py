"""Model building blocks: norms, rotary embeddings, attention, feed-forward, decoder, KV cache, masks."""

from tunekit.modules.attention import Attention
from tunekit.modules.feed_forward import ACTIVATIONS, FeedForward
from tunekit.modules.kv_cache import KVCache
from tunekit.modules.masks import (
    block_causal_mask,
    causal_mask,
    document_ids_from_seq_lens,
    document_positions,
    padding_mask,
    padding_positions,
    sliding_window_mask,
)
from tunekit.modules.rms_norm import RMSNorm
from tunekit.modules.rope import RotaryEmbedding, reset_rope_buffers, rope_inv_freq
from tunekit.modules.transformer import TransformerDecoder, TransformerDecoderLayer

__all__ = [
    "ACTIVATIONS", "Attention", "FeedForward", "KVCache", "RMSNorm", "RotaryEmbedding", "TransformerDecoder",
    "TransformerDecoderLayer", "block_causal_mask", "causal_mask", "document_ids_from_seq_lens",
    "document_positions", "padding_mask", "padding_positions", "reset_rope_buffers", "rope_inv_freq",
    "sliding_window_mask",
]
