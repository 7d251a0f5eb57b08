"""Key/value cache for incremental decoding."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Preallocated keys and values ``[b, n_kv_heads, max_seq_len, head_dim]``.

    ``update`` writes the new keys/values at their positions and returns the whole cache; the
    caller masks positions not written yet.
    """

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v: [b, s, n_kv_heads, head_dim]`` at ``input_pos: Long[b, s]``.

        Returns the full caches ``[b, n_kv_heads, max_seq_len, head_dim]``.
        """
        b = k.shape[0]
        if b > self.k_cache.shape[0]:
            raise ValueError(f"batch size {b} exceeds the KV cache batch size {self.k_cache.shape[0]}")
        rows = torch.arange(b, device=input_pos.device)[:, None]
        # advanced indices around a slice put the indexed dims first: [b, s, n_kv_heads, head_dim]
        self.k_cache[rows, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[rows, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache[:b], self.v_cache[:b]
