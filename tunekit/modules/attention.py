"""Grouped-query self-attention over ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunekit.modules.causal_attention import causal_attention
from tunekit.modules.kv_cache import KVCache
from tunekit.modules.masks import causal_mask, sliding_window_mask


class Attention(nn.Module):
    """Multi-head attention with ``num_kv_heads`` key/value heads shared by groups of query heads.

    Every submodule is given ready-made, so adapters can replace ``q_proj``, ``k_proj``, ``v_proj``
    or ``output_proj`` by any module with the same call signature.

    Args:
        num_heads, num_kv_heads, head_dim: query heads, key/value heads (divides ``num_heads``),
            channels per head.
        q_proj, k_proj, v_proj: ``dim -> num_heads * head_dim`` / ``num_kv_heads * head_dim``.
        output_proj: ``num_heads * head_dim -> dim``.
        pos_emb: rotary embedding applied to q and k (after q_norm/k_norm), or None.
        q_norm, k_norm: per-head norms over ``head_dim`` (Qwen3), or None.
        sliding_window: a key more than ``sliding_window - 1`` positions behind the query is hidden.
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` (Gemma 2); this takes
            the slower explicit attention path.
        scale: score scale, default ``head_dim ** -0.5``.

    Forward: ``x [b, s, dim]``, ``mask: Bool[b, s, s]`` (``[b, s, cache_len]`` with a KV cache) or
    None for causal, ``input_pos: Long[b, s]`` or None -> ``[b, s, dim]``.

    ``prefix`` (None unless prefix tuning sets it, see ``tunekit.modules.peft.PrefixTuning``) adds
    learned keys/values in front of the real ones, visible to every query; not with a KV cache.
    """

    def __init__(self, *, num_heads: int, num_kv_heads: int, head_dim: int, q_proj: nn.Module,
                 k_proj: nn.Module, v_proj: nn.Module, output_proj: nn.Module, pos_emb: nn.Module | None = None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None,
                 sliding_window: int | None = None, softcap: float | None = None, scale: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if (q_norm is None) != (k_norm is None):
            raise ValueError("q_norm and k_norm must be given together")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj, self.k_proj, self.v_proj, self.output_proj = q_proj, k_proj, v_proj, output_proj
        self.pos_emb = pos_emb
        self.q_norm, self.k_norm = q_norm, k_norm
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.kv_cache: KVCache | None = None
        # Prefix tuning: a module whose call ``prefix(batch_size)`` returns learned
        # ``(keys, values)``, each ``[b, num_kv_heads, n, head_dim]``, seen by every query.
        self.prefix: nn.Module | None = None

    def setup_cache(self, batch_size: int, max_seq_len: int, dtype: torch.dtype,
                    device: torch.device | str | None = None) -> None:
        self.kv_cache = KVCache(batch_size, max_seq_len, self.num_kv_heads, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.pos_emb is not None:
            q, k = self.pos_emb(q, input_pos), self.pos_emb(k, input_pos)
        q = q.transpose(1, 2)

        if self.kv_cache is not None:
            if input_pos is None:
                raise ValueError("input_pos is required when the KV cache is enabled")
            if self.prefix is not None:
                raise NotImplementedError("prefix tuning does not support the KV cache; generate with use_cache=False")
            k, v = self.kv_cache.update(input_pos, k, v)
            k_pos = torch.arange(k.shape[2], device=x.device)
            if mask is None:
                mask = k_pos <= input_pos[:, :, None]  # written positions at or before the query
            if self.sliding_window is not None:
                mask = mask & sliding_window_mask(input_pos, k_pos, self.sliding_window)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if self.sliding_window is not None:
                rows = torch.arange(s, device=x.device)
                window = sliding_window_mask(rows, rows, self.sliding_window)
                mask = (causal_mask(s, x.device) if mask is None else mask) & window
            if self.prefix is not None:
                k, v, mask = self._prepend_prefix(k, v, mask)

        attn_mask = None if mask is None else mask[:, None] if mask.dim() == 3 else mask
        if self.softcap is not None:
            out = _softcapped_attention(q, k, v, attn_mask, self.scale, self.softcap)
        elif attn_mask is None:
            out = causal_attention(q, k, v, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
        return self.output_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def _prepend_prefix(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Put the ``n`` prefix keys/values in front of ``k, v [b, kv_h, s, d]`` -> ``[b, kv_h, n + s, d]``
        and widen ``mask`` (``[s, s]``, ``[b, s, s]`` or None = causal) to ``[..., s, n + s]``.

        The prefix carries no rotary embedding (it has no position) and is visible to every query,
        also across packed documents and outside a sliding window. The mask must be explicit:
        SDPA's ``is_causal`` aligns the triangle top-left when there are more keys than queries.
        """
        pk, pv = self.prefix(k.shape[0])
        s = k.shape[2]
        real = causal_mask(s, k.device) if mask is None else mask
        mask = torch.cat([real.new_ones(*real.shape[:-1], pk.shape[2]), real], dim=-1)
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2), mask


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          scale: float, softcap: float) -> torch.Tensor:
    """Explicit attention with tanh soft-capped scores; ``q [b, h, s, d]``, ``k, v [b, kv_h, t, d]``."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = causal_mask(q.shape[2], q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
