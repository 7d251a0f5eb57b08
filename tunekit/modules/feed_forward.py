"""Gated feed-forward layers: SwiGLU and GeGLU (Shazeer, 2020)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# HF ``hidden_act`` names -> the gate activation they mean
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


class FeedForward(nn.Module):
    """``w2(act(w1(x)) * w3(x))``: ``w1`` is the gate, ``w3`` the up and ``w2`` the down projection.

    ``activation=F.silu`` is SwiGLU, ``F.gelu`` (tanh or exact) is GeGLU.
    Shapes: ``x [..., dim] -> [..., dim]``.
    """

    def __init__(self, *, w1: nn.Module, w2: nn.Module, w3: nn.Module,
                 activation: Callable[[torch.Tensor], torch.Tensor] = F.silu):
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.activation(self.w1(x)) * self.w3(x))
