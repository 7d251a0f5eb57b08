"""Rotary position embeddings (Su et al., 2021) in the "rotate half" layout used by HF checkpoints.

The cos/sin tables are non-persistent buffers: they are not in the state dict, so a model built on
the meta device and materialised with ``to_empty`` has garbage tables. Call
:func:`reset_rope_buffers` (or ``RotaryEmbedding.rope_init``) afterwards; ``tunekit.models.from_hf``
does this for you.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies ``[dim // 2]`` (fp32, CPU) for ``dim`` rotary channels.

    ``scaling`` follows HF's ``rope_parameters`` spelling: ``{"rope_type": "linear", "factor": f}``
    divides every frequency by ``f`` (position interpolation); ``{"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}`` is Llama 3.1's
    scheme: long wavelengths are divided by ``factor``, short ones kept, the band between
    interpolated smoothly.
    """
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (base ** exponent)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # smooth = 0 at the low-frequency edge (wavelength old_len/low), 1 at the high one
        smooth = (old_len / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(in_band, interpolated, out)
    raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to the first ``dim`` channels of each head.

    Args:
        dim: rotary channels per head (``head_dim``, or fewer for partial rotary).
        max_seq_len: length of the precomputed tables; positions must be below it.
        base: rope theta.
        scaling: HF-style rope scaling dict (see :func:`rope_inv_freq`), or None.

    Forward: ``x [b, s, n_heads, head_dim]``, ``input_pos [b, s]`` or None (``arange(s)``)
    -> same shape and dtype as ``x``.
    """

    def __init__(self, dim: int, max_seq_len: int, base: float = 10_000.0, scaling: dict | None = None):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim, self.max_seq_len, self.base = dim, max_seq_len, base
        self.scaling = dict(scaling) if scaling else None
        rope_inv_freq(2, base, self.scaling)  # fail at build time on unsupported scaling
        self.register_buffer("cos", torch.empty(max_seq_len, dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, dim), persistent=False)
        self.rope_init()

    def rope_init(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the cos/sin tables, on ``device`` if given (reallocating them), else in place.

        In place on the meta device is a no-op.
        """
        if device is not None:
            self.cos = torch.empty(self.max_seq_len, self.dim, device=device)
            self.sin = torch.empty(self.max_seq_len, self.dim, device=device)
        device = self.cos.device
        if device.type == "meta":
            return
        inv_freq = rope_inv_freq(self.dim, self.base, self.scaling)
        freqs = torch.arange(self.max_seq_len, device="cpu").float()[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        with torch.no_grad():
            self.cos.copy_(angles.cos().to(device))
            self.sin.copy_(angles.sin().to(device))

    def reset_parameters(self) -> None:
        self.rope_init()

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        if input_pos is None:
            seq_len = x.shape[1]
            if seq_len > self.max_seq_len:
                raise ValueError(f"sequence length {seq_len} exceeds the rotary table length {self.max_seq_len}; "
                                 "build the model with a larger max_seq_len")
            cos, sin = self.cos[:seq_len, None, :], self.sin[:seq_len, None, :]
        else:
            cos, sin = self.cos[input_pos].unsqueeze(2), self.sin[input_pos].unsqueeze(2)
        # HF casts the tables to the activation dtype before multiplying; so do we
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if self.dim == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        rot, rest = x[..., : self.dim], x[..., self.dim:]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_seq_len={self.max_seq_len}, base={self.base}, scaling={self.scaling}"


def reset_rope_buffers(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Recompute every rotary table in ``model``.

    Call it after ``model.to_empty(device=...)`` of a meta-built model, or pass ``device`` to
    allocate tables that are still on the meta device (e.g. after ``load_state_dict(assign=True)``).
    """
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.rope_init(device)
