"""FSDP2 sharding for the distributed recipes: shard a model (or a model whose weights exist on
rank 0 only), full state dicts in and out, gradient accumulation without redundant reductions.

Model code never sees any of this: sharding is applied from outside on ``model.layers`` and the
root module.

Gradient reduction convention (see ``shard_model``): FSDP reduces gradients with a plain SUM over
ranks (divide factor 1) and every rank scales its summed token loss by ``1 / global_token_count``
(``tunekit.training.process_group``). The gradient is then exactly d(sum of token losses over all
ranks and micro-batches) / N, the single-process math, with no multiply-by-world-size /
divide-by-world-size round trip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tunekit.config.errors import UserError
from tunekit.modules.rope import reset_rope_buffers
from tunekit.training.activation_checkpointing import apply_activation_checkpointing
from tunekit.training.process_group import (
    communication_device,
    get_world_size_and_rank,
    is_distributed,
    is_rank_zero,
    local_device,
)

def shard_model(
    model: nn.Module,
    *,
    mp_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
) -> nn.Module:
    """Shard ``model`` with FSDP2 in place: each of ``model.layers`` is one FSDP unit (its
    parameters are all-gathered just for its forward/backward), the rest (embedding, final norm,
    output) belongs to the root unit. Returns ``model``.

    Args:
        mp_dtype: compute dtype (e.g. torch.bfloat16); parameters keep their stored dtype and are
            cast when gathered. None = compute in the stored dtype.
        reduce_dtype: with ``mp_dtype``, the dtype gradients are reduced in (fp32 keeps the sum
            over ranks accurate in bf16 runs). Without ``mp_dtype`` gradients are reduced in the
            parameters' own dtype.
        reshard_after_forward: free gathered layer weights after forward (ZeRO-3); False keeps
            them until backward (ZeRO-2 like: more memory, fewer all-gathers).
        activation_checkpointing: recompute each layer's activations in backward; applied before
            sharding via ``tunekit.training.activation_checkpointing``.
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.

    Gradients are reduced as a SUM over ranks (see the module docstring): scale each rank's
    summed loss by ``1 / global_token_count(...)``.
    Works on meta-device models (then load weights with ``load_full_state_dict``) and on models
    holding frozen NF4 (QLoRA) weights.
    """
    _check_shardable(model, "shard_model")
    _check_nf4_shardable(model, dist.get_world_size())
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    kwargs = _fsdp_kwargs(mp_dtype, reduce_dtype, reshard_after_forward, cpu_offload)
    for layer in model.layers:
        fully_shard(layer, **kwargs)
    _shard_root(model, kwargs)
    return model


def shard_from_rank0(
    model: nn.Module,
    *,
    device: torch.device | str,
    before_shard: Callable[[nn.Module], None] | None = None,
    mp_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
) -> nn.Module:
    """Shard a model whose weights exist on rank 0 only, one FSDP unit at a time: the memory-lean
    start of the distributed recipes. Returns ``model``, sharded as ``shard_model`` does.

    Rank 0 passes the real model (e.g. on CPU, as ``from_hf`` returns it); every other rank the same
    architecture on the meta device (same parameter names, shapes and dtypes). For each decoder
    layer, then for the modules outside ``model.layers``: the unit is materialised on ``device``,
    its parameters are broadcast from rank 0, rotary tables recomputed, ``before_shard(unit)``
    runs (e.g. NF4-quantizing QLoRA bases, identically on every rank) and the unit is sharded.
    So a rank holds its shards plus at most one full unit, and rank 0 additionally the model it
    was given (one full copy, freed unit by unit as FSDP replaces its parameters by shards).
    The other arguments are those of ``shard_model``.
    """
    _check_shardable(model, "shard_from_rank0")
    device = local_device(device)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    kwargs = _fsdp_kwargs(mp_dtype, reduce_dtype, reshard_after_forward, cpu_offload)
    world_size = dist.get_world_size()
    for layer in model.layers:
        _materialize_from_rank0(layer, device)
        if before_shard is not None:
            before_shard(layer)
        _check_nf4_shardable(layer, world_size)
        fully_shard(layer, **kwargs)
    for name, child in model.named_children():
        if name != "layers":
            _materialize_from_rank0(child, device)
            if before_shard is not None:
                before_shard(child)
    if any(p.is_meta for p in model.parameters(recurse=False)):
        raise ValueError("shard_from_rank0: the root module holds parameters of its own; put them in a submodule")
    _check_nf4_shardable(model, world_size)
    _shard_root(model, kwargs)
    return model


def _check_shardable(model: nn.Module, caller: str) -> None:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(
            f"{caller}: {type(model).__name__} has no non-empty nn.ModuleList `layers`; "
            "the model contract requires decoder layers in model.layers"
        )
    if isinstance(model, FSDPModule):
        raise ValueError(f"{caller}: the model is already sharded; call {caller} once")
    if not is_distributed():
        raise RuntimeError(f"{caller}: no process group; call init_distributed(device) first")


def _fsdp_kwargs(mp_dtype, reduce_dtype, reshard_after_forward, cpu_offload) -> dict:
    kwargs: dict = {"reshard_after_forward": reshard_after_forward}
    if mp_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=reduce_dtype)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    return kwargs


def _shard_root(model: nn.Module, kwargs: dict) -> None:
    # The root's parameters (output projection) are needed right after the last layer's forward,
    # so resharding them after forward would only add an all-gather.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    for module in _fsdp_modules(model):
        module.set_gradient_divide_factor(1.0)
        # Without this a factor of 1 becomes ReduceOp.PREMUL_SUM, which gloo lacks; a plain SUM
        # is also NCCL's zero-copy path.
        module.set_force_sum_reduction_for_comms(True)


def _materialize_from_rank0(module: nn.Module, device: torch.device) -> None:
    """Give ``module`` rank 0's parameter values on every rank (on ``device``)."""
    rank = dist.get_rank()
    if rank == 0:
        module.to(device)
    else:
        module.to_empty(device=device)
    params = dict(module.named_parameters())
    layout = [(name, p.dtype, tuple(p.shape)) for name, p in params.items()]
    reference = [layout]
    dist.broadcast_object_list(reference, src=0)
    if reference[0] != layout:
        raise ValueError(
            f"shard_from_rank0: rank {rank} built a different model than rank 0 "
            f"({sorted(set(reference[0]) ^ set(layout))[:4]} ...); build the same architecture and dtype on every rank"
        )
    comm_device = communication_device()
    for p in params.values():
        buffer = p.data if p.device == comm_device else p.data.to(comm_device)
        dist.broadcast(buffer, src=0)
        if buffer is not p.data:
            p.data.copy_(buffer)
    reset_rope_buffers(module, device=device)


def _check_nf4_shardable(model: nn.Module, world_size: int) -> None:
    # FSDP splits an NF4 weight along dim 0 together with its per-block scales; torchao asserts
    # deep inside backward-of-forward if they do not divide evenly, so say it here instead.
    for name, param in model.named_parameters():
        if type(param.data) is torch.Tensor:
            continue
        from tunekit.modules.peft.nf4 import is_nf4

        if not is_nf4(param):
            continue
        pieces = {"rows": param.shape[0], "absmax blocks": param.quantized_scalers.numel(),
                  "second-level scale blocks": param.quantization_factor.numel()}
        bad = [f"{n} ({v})" for n, v in pieces.items() if v % world_size]
        if bad:
            raise UserError(
                f"shard_model: NF4 weight '{name}' {list(param.shape)} cannot be split across {world_size} "
                f"ranks: its {', '.join(bad)} are not divisible by {world_size}; use a world size that "
                "divides them or leave this layer unquantized"
            )


def load_full_state_dict(
    model: nn.Module,
    full_state_dict: dict[str, torch.Tensor] | None,
    *,
    device: torch.device | str = "cpu",
    from_rank0: bool = True,
    strict: bool = True,
) -> None:
    """Load a full (unsharded, e.g. HF-loaded) state dict into a sharded model.

    With ``from_rank0`` only rank 0 needs the tensors (other ranks pass None or {}): tensors are
    broadcast one at a time and each rank keeps its shard, so no rank holds two full copies. A
    model still on the meta device is first materialised on ``device`` (uninitialised); buffers
    missing from the state dict (e.g. rotary caches) must then be re-initialised by the caller.
    The caller's dict is left untouched (torch replaces the values of the dict it is given).
    """
    device = local_device(device)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model.to_empty(device=device)
    world_size, rank = get_world_size_and_rank()
    if from_rank0 and rank != 0:
        state = {}
    else:
        if not full_state_dict:
            raise ValueError(
                f"load_full_state_dict: rank {rank} got an empty state dict; "
                "pass the loaded checkpoint (on rank 0 at least)"
            )
        state = dict(full_state_dict)  # shallow: torch swaps the values, not the caller's tensors
    options = StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=from_rank0 and world_size > 1, strict=strict
    )
    set_model_state_dict(model, state, options=options)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Full, unsharded CPU tensors on rank 0 ({} on other ranks), keyed by tunekit names, for
    writing HF / PEFT checkpoints from rank 0. ``trainable_only`` keeps just the parameters with
    ``requires_grad`` (LoRA adapters), which skips gathering the frozen base. Collective: call on
    every rank.

    Each value has its parameter's full shape (e.g. ``[out_features, in_features]`` for a Linear
    weight) and stored dtype; frozen QLoRA bases come back as NF4 tensors of that shape
    (dequantize them before writing safetensors). Parameters are gathered one at a time and every
    collective has finished on every rank when this returns; a rank other than 0 holds at most one
    full parameter at a time.
    """
    # Why not get_model_state_dict(full_state_dict=True, cpu_offload=True), which this replaced:
    # torchao all-gathers an NF4 DTensor as three functional all-gathers of its inner tensors and
    # returns an NF4 tensor whose inner tensors are still in flight (waited on first use). torch
    # keeps only rank 0's values, so the other ranks never waited: 3 works per NF4 weight stayed
    # in torch's functional-collective registry after every gather (42 more per gather of the
    # 14-weight test model, on every rank), and rank 0 returned in 0.04 s while rank 1 joined 2 s
    # late (2.03 s for fp32 weights). Waiting here ends that, but it did NOT end the rare native
    # gloo crash it was suspected of (heap corruption / SIGSEGV while gathering NF4 weights: still
    # 3 crashes and a hang in ~200 gathers of scripts/repro_gloo_crash.py's gather-loop with this
    # function); see docs/distributed.md, "Native crash rate under gloo".
    sharded = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=trainable_only))
    keep = is_rank_zero()
    full: dict[str, torch.Tensor] = {}
    for name, value in sharded.items():
        if isinstance(value, DTensor):
            value = _finished(value.full_tensor())  # collective: every rank, same order
        if keep:
            full[name] = value.to("cpu")
        del value  # other ranks: drop this parameter before gathering the next
    return full


def _finished(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (any shape) with every functional collective that produces it, or any of its
    inner tensors (tensor subclasses such as NF4, via ``__tensor_flatten__``), waited on."""
    if isinstance(tensor, AsyncCollectiveTensor):
        return tensor.wait()
    if type(tensor) is torch.Tensor or not hasattr(tensor, "__tensor_flatten__"):
        # a no-op unless the tensor is the pending output of a functional collective
        return torch.ops._c10d_functional.wait_tensor(tensor)
    names, context = tensor.__tensor_flatten__()
    inner = {n: _finished(getattr(tensor, n)) for n in names}
    return type(tensor).__tensor_unflatten__(inner, context, tensor.size(), tensor.stride())


def _fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within this context backward accumulates local (unreduced) gradients: use it for every
    micro-batch but the last of an accumulation step, which then reduces once. No-op on an
    unsharded model or with ``enabled=False``."""
    modules = _fsdp_modules(model) if enabled else []
    for m in modules:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_requires_gradient_sync(True, recurse=False)
