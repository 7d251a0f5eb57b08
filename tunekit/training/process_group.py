"""The process group of a distributed run: set-up and tear-down, rank queries, the small
collectives the recipes use (a flag from any rank, sums over ranks, the global label-token count),
rank-zero logging.

Launch with torchrun (``tunekit run --nproc_per_node N <recipe>_distributed ...``); every function
also works in a plain single process (world size 1). Sharding the model: ``tunekit.training.fsdp``.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import NoReturn

import torch
import torch.distributed as dist

from tunekit.config.errors import UserError, user_errors
from tunekit.losses.cross_entropy import IGNORE_INDEX, count_label_tokens

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_world_size_and_rank() -> tuple[int, int]:
    """(world_size, rank) of the default process group, (1, 0) without one."""
    if is_distributed():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_rank_zero() -> bool:
    """True on global rank 0; before the process group exists, from torchrun's ``RANK``."""
    if is_distributed():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", 0)) == 0


def local_device(device: torch.device | str) -> torch.device:
    """The device this process computes on: under torchrun ``<type>:LOCAL_RANK`` for an
    accelerator (cuda, xpu, ...), else the given device (index 0 if none); CPU as given."""
    device = torch.device(device)
    if device.type == "cpu":
        return device
    if "LOCAL_RANK" in os.environ:
        return torch.device(device.type, int(os.environ["LOCAL_RANK"]))
    return torch.device(device.type, device.index or 0)


def init_distributed(device: torch.device | str, *, timeout_minutes: float = 30.0) -> tuple[int, int]:
    """Initialise the default process group for ``device`` and return (rank, world_size).

    The backend follows the device type (nccl on CUDA, xccl on XPU, gloo on CPU). Under torchrun
    the rendezvous comes from its environment; in a plain ``python`` process a one-process group
    is created in memory so the same recipe code runs unchanged. On an accelerator the
    current device becomes ``LOCAL_RANK``; on CPU each rank gets ``cores // local_world_size``
    threads so ranks sharing a machine do not oversubscribe its cores. Idempotent.
    """
    device = torch.device(device)
    if not dist.is_available():
        raise RuntimeError("init_distributed: this torch build has no torch.distributed support")
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if device.type != "cpu":
        if not torch.accelerator.is_available() or torch.accelerator.current_accelerator().type != device.type:
            raise UserError(f"device={device}: not available on this machine; use device=cpu")
        index = local_device(device).index
        if index >= torch.accelerator.device_count():
            raise UserError(
                f"device={device}: this process needs {device.type}:{index} (LOCAL_RANK) but only "
                f"{torch.accelerator.device_count()} {device.type} devices are visible; lower --nproc_per_node"
            )
        torch.accelerator.set_device_index(index)
    else:
        torch.set_num_threads(max(1, _available_cores() // max(1, local_world_size)))

    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    backend = dist.get_default_backend_for_device(device)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if all(v in os.environ for v in _TORCHRUN_VARS):
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # plain `python recipe.py`: an in-memory store, no port to pick
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    """Tear down the default process group (no-op without one); call at the end of a recipe."""
    if is_distributed():
        dist.destroy_process_group()


def exit_after_clean_run(code: int = 0) -> NoReturn:
    """End a distributed process whose run finished (process group already destroyed): flush
    stdout/stderr and logging, then leave without interpreter finalization with exit ``code``.

    Why: with torch 2.13 on gloo, about 1 launch in 20 here aborts AFTER a clean
    ``destroy_process_group`` returned, during interpreter finalization ("terminate called without
    an active exception", seen on CPU in tests and CI), which turns a finished run with all its
    checkpoints into a failed torchrun exit code. Everything a recipe writes is closed before this.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def run_distributed_recipe(main: Callable[[], None]) -> NoReturn:
    """The ``__main__`` of a distributed recipe: run ``main()``; a ``UserError`` on this rank
    prints one ``tunekit: error:`` line and exits 2, as in the single-device recipes; the process
    group is torn down either way and the process leaves through :func:`exit_after_clean_run`.
    A bug keeps its traceback (and Python's normal exit)."""
    code = 0
    try:
        with user_errors():
            main()
    except SystemExit as e:  # user_errors' exit 2, or a recipe's own sys.exit
        code = e.code if isinstance(e.code, int) else 1
    finally:
        destroy_distributed()
    exit_after_clean_run(code)


def log_rank_zero(logger: logging.Logger, message: str, level: int = logging.INFO) -> None:
    """Log ``message`` on rank 0 only, so N ranks do not print N copies."""
    if is_rank_zero():
        logger.log(level, message)


def communication_device() -> torch.device:
    """Where collectives of this process group take their tensors."""
    # gloo reduces CPU tensors; nccl / xccl only accelerator tensors.
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def global_token_count(labels: torch.Tensor | Iterable[torch.Tensor], ignore_index: int = IGNORE_INDEX) -> int:
    """Number of labels != ``ignore_index`` over the given micro-batches (one tensor or a list of
    ``labels`` [b, s], on any device) summed over all ranks: the loss denominator of one
    optimizer step. Collective when distributed: every rank must call it."""
    if isinstance(labels, torch.Tensor):
        labels = [labels]
    labels = list(labels)
    if not labels:
        raise ValueError("global_token_count: no micro-batches given")
    count = sum(count_label_tokens(lab, ignore_index) for lab in labels)
    if is_distributed():
        total = torch.tensor(count, dtype=torch.int64, device=communication_device())
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        count = int(total.item())
    return count


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank (e.g. Ctrl-C seen by one process): every rank then
    takes the same branch. Collective when distributed."""
    if not is_distributed():
        return flag
    value = torch.tensor(int(flag), device=communication_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Each value summed over all ranks (one all-reduce for all of them); unchanged without a
    process group. Collective when distributed."""
    if not is_distributed():
        return values
    total = torch.tensor(values, dtype=torch.float64, device=communication_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return tuple(total.tolist())


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank; ``obj`` itself without a process group."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()
