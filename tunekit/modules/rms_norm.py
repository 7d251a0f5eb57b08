"""Root-mean-square layer norm (Zhang & Sennrich, 2019)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * w``, normalised in fp32.

    Two rounding conventions exist in the wild and logits only match to the last bit when we follow
    the checkpoint's own one:

    * Llama/Mistral/Qwen (``offset=False``): normalise in fp32, cast back to the input dtype, *then*
      multiply by ``w`` (in ``w``'s dtype).
    * Gemma (``offset=True``): the weight is stored as ``w - 1`` (zero init); scale by ``1 + w`` in
      fp32 and cast back last.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square.
        offset: use the Gemma ``(1 + w)`` parameterisation.

    Shapes: ``x [..., dim] -> [..., dim]``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, offset: bool = False):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.offset else nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"
