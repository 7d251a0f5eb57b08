"""Device and dtype names from configs -> torch objects."""

from __future__ import annotations

import torch

from tunekit.config.errors import UserError

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def get_device(name: str) -> torch.device:
    """``"auto"`` (the accelerator if there is one, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ..."""
    if name == "auto":
        if torch.accelerator.is_available():
            return torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())
        return torch.device("cpu")
    problem = device_problem(name)
    if problem:
        raise UserError(f"device={name}: {problem}")
    device = torch.device(name)
    if device.type != "cpu" and not (torch.accelerator.is_available()
                                     and torch.accelerator.current_accelerator().type == device.type):
        raise UserError(f"device={name}: no {device.type} device is available on this machine; "
                        "use device=cpu or device=auto")
    return device


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a device name (None when it is one): the config check of ``device``."""
    if name == "auto":
        return None
    try:
        torch.device(name)
    except RuntimeError:
        return "not a device name; use auto, cpu or an accelerator like cuda or cuda:1"
    return None


def get_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """``"fp32"`` or ``"bf16"`` -> torch dtype (bf16 is refused on a CUDA GPU without bf16 support)."""
    if name not in _DTYPES:
        raise UserError(f"dtype={name}: unknown dtype; use fp32 or bf16")
    dtype = _DTYPES[name]
    if dtype == torch.bfloat16 and device is not None and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("dtype=bf16: this GPU has no bf16 support; use dtype=fp32")
    return dtype
