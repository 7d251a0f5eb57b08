"""Activation offloading: tensors autograd saves for backward are copied to host memory during
forward and brought back in backward, trading transfer time for accelerator memory.

The same code path runs on CPU (the copy is then host to host), which is how it is tested.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def offload_activations(device: torch.device | str, *, enabled: bool = True, min_bytes: int = 1024):
    """Context manager for the forward pass: every saved plain tensor of at least ``min_bytes``
    is kept on the host (pinned memory when ``device`` is CUDA) until backward needs it.

    Parameters and tensor subclasses (DTensor, NF4) are left in place: parameters are already
    resident, and copying them every step would only cost bandwidth.
    """
    if not enabled:
        yield
        return
    device = torch.device(device)
    pin = device.type == "cuda"

    def pack(tensor: torch.Tensor):
        if (type(tensor) is not torch.Tensor or tensor.numel() * tensor.element_size() < min_bytes):
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
        host.copy_(tensor, non_blocking=pin)
        return (tensor.device, host)

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        original_device, host = packed
        return host.to(original_device, non_blocking=pin)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
