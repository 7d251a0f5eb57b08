"""Errors of checkpoint files a user gave us (or that a run would write), and the finiteness check."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from tunekit.config.errors import UserError


class CheckpointError(UserError):
    """A checkpoint file or folder is unreadable or does not fit (invalid JSON, a truncated
    safetensors file, a pickle that ``weights_only`` refuses, a missing or mis-shaped tensor, an
    unreadable recipe state). The message names the file (and tensor) and says what to do."""


class NonFiniteError(UserError):
    """A NaN or infinity in a loss, a gradient, or a weight being loaded or saved. Training stops
    before such values reach a checkpoint; the message names the step or the tensor."""


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str, *, action: str) -> None:
    """Raise :class:`NonFiniteError` naming the first floating-point tensor of ``(name, tensor)``
    pairs that holds a NaN or an infinity. ``where`` names the file or folder, ``action`` says what
    was being done ("loading", "saving")."""
    for name, tensor in tensors:
        # plain tensors only: quantized (NF4) and sharded (DTensor) subclasses are checked in the
        # plain form they are saved in
        if type(tensor.detach()) is not torch.Tensor or not tensor.is_floating_point() or tensor.is_meta:
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            raise NonFiniteError(
                f"{where}: tensor '{name}' {list(tensor.shape)} holds {bad} NaN/infinite value(s) ({action}); "
                + ("this checkpoint is damaged: use an earlier one or the original weights" if action == "loading"
                   else "the run diverged: nothing was written; lower the learning rate or check the data"))
