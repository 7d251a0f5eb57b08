"""A model builder for tests of the non-finite guard: ``tunekit.models.from_hf`` plus a backward
hook that turns the gradient reaching the final norm into NaN on the ``nan_at_backward``-th
backward pass (with one micro-batch per step: during that optimizer step), so every parameter
below it gets a NaN gradient while the loss stays finite. Used in-process and under torchrun
(with ``PYTHONPATH`` pointing here)."""

from __future__ import annotations

import torch

from tunekit.models import from_hf


def from_hf_with_nan_gradient(checkpoint_dir: str, *, nan_at_backward: int, dtype: torch.dtype | None = None,
                              device: str | torch.device = "cpu"):
    model = from_hf(checkpoint_dir, dtype=dtype, device=device)
    calls = {"n": 0}

    def poison(module, grad_output):
        calls["n"] += 1
        if calls["n"] == nan_at_backward:
            return tuple(g * float("nan") if g is not None else None for g in grad_output)
        return None

    model.norm.register_full_backward_pre_hook(poison)
    return model
