"""The one place tunekit touches torchao's NF4 (4-bit NormalFloat, Dettmers et al. 2023).

torchao moved NF4 between releases (0.17: ``torchao.dtypes.nf4tensor``; 0.18:
``torchao.quantization.quantize_.workflows.nf4.nf4_tensor``); everything else in tunekit imports
these wrappers so a future move is a one-line change here.
"""

from __future__ import annotations

import importlib
import logging

import torch

from tunekit.config.errors import UserError

# torchao logs "Failed to load ... .so" for its CUDA-only extensions on every CPU import.
logging.getLogger("torchao").setLevel(logging.ERROR)

_NF4_MODULE_PATHS = (
    "torchao.quantization.quantize_.workflows.nf4.nf4_tensor",  # torchao >= 0.18
    "torchao.dtypes.nf4tensor",  # torchao <= 0.17
)


def _import_nf4():
    for path in _NF4_MODULE_PATHS:
        try:
            return importlib.import_module(path)
        except ImportError:
            continue
    try:
        import torchao

        version = getattr(torchao, "__version__", "unknown")
    except ImportError:
        raise ImportError(
            "QLoRA (quantize_base=True) needs torchao: pip install torchao"
        ) from None
    raise ImportError(
        f"torchao {version} has no NF4 tensor at any known location ({', '.join(_NF4_MODULE_PATHS)}); "
        "install torchao 0.17 or 0.18, or add the new module path to tunekit/modules/peft/nf4.py"
    )


_nf4 = _import_nf4()
NF4Tensor = _nf4.NF4Tensor

# torchao's defaults: 64 weights share one absmax scale, 256 scales share one second-level scale.
BLOCK_SIZE = 64
SCALER_BLOCK_SIZE = 256


def _scaler_block_size(n_blocks: int) -> int:
    # The second-level block must divide the number of first-level blocks; shrink it (powers of
    # two) for small matrices such as the dim-64 test models instead of refusing them.
    size = SCALER_BLOCK_SIZE
    while size > 1 and n_blocks % size:
        size //= 2
    return size


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """Quantize a 2-D floating-point weight [out, in] to an NF4 tensor of the same shape and dtype.

    The number of elements must be a multiple of 64 (one absmax block).
    """
    if weight.device.type == "meta":
        raise ValueError(
            "cannot quantize a weight on the meta device to NF4: load the base weights first, "
            "then apply QLoRA (apply_lora(..., quantize_base=True))"
        )
    if weight.dim() != 2 or weight.numel() % BLOCK_SIZE:
        raise UserError(
            f"QLoRA: NF4 needs a 2-D weight whose size is a multiple of {BLOCK_SIZE}, got shape "
            f"{tuple(weight.shape)}; leave this layer out of lora.targets or set lora.quantize_base=false"
        )
    weight = weight.detach().contiguous()
    n_blocks = weight.numel() // BLOCK_SIZE
    return _nf4.to_nf4(weight, BLOCK_SIZE, _scaler_block_size(n_blocks))


def is_nf4(tensor: torch.Tensor) -> bool:
    """True if ``tensor`` (or the Parameter wrapping it) is an NF4 tensor."""
    return isinstance(tensor, NF4Tensor)


def nf4_dequantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain tensor [out, in] in ``dtype`` (default: the dtype the weight was quantized from)."""
    return weight.get_original_weight().to(dtype or weight.dtype)


def linear_nf4(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ dequant(weight [out, in]).T -> [..., out]; gradient flows to x only."""
    return _nf4.linear_nf4(x, weight)


def nf4_nbytes(weight: torch.Tensor) -> int:
    """Bytes held by an NF4 tensor: packed 4-bit codes plus its scales and lookup table."""
    inner_names, _ = weight.__tensor_flatten__()
    return sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in inner_names)
