"""Sharded recipe state (model + optimizer + small extras) with torch.distributed.checkpoint.

Each rank writes only its own shards, in parallel, and a later run may load them with a different
number of processes (DCP reshards on load). This is the fast-resume format; HF / PEFT checkpoints
for users are written separately from ``gather_full_state_dict`` on rank 0.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tunekit.checkpoint.errors import CheckpointError
from tunekit.checkpoint.step_folders import resume_hint
from tunekit.training.process_group import get_world_size_and_rank, is_distributed

EXTRA_FILE = "extra.pt"


@contextlib.contextmanager
def _single_process_is_intended():
    # DCP warns whenever no process group exists; for us one process is a supported case
    # (resuming a multi-process run on one device), not an accident.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _per_rank_file(rank: int, world_size: int) -> str:
    return f"rank{rank}_of{world_size}.pt"


def save_sharded_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                       extra: dict | None = None, *, per_rank: dict | None = None,
                       trainable_only: bool = False) -> None:
    """Write model and optimizer state (sharded or not) to ``directory`` with DCP, plus ``extra``
    (step, data position, ...: tensors and plain Python values) from rank 0 and ``per_rank``
    (e.g. this rank's RNG state) from every rank. ``trainable_only`` leaves out frozen parameters
    (a LoRA base, reloaded from its own checkpoint on resume). Collective: call on every rank with
    the same directory."""
    directory = Path(directory)
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    with _single_process_is_intended():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=directory,
                 no_dist=not is_distributed())
    world_size, rank = get_world_size_and_rank()
    if per_rank is not None:
        torch.save(per_rank, directory / _per_rank_file(rank, world_size))
    if rank == 0:
        torch.save(dict(extra or {}), directory / EXTRA_FILE)
    if is_distributed():
        dist.barrier()  # nobody treats the folder as complete before extra.pt exists


def load_sharded_state(directory: str | os.PathLike, model: nn.Module,
                       optimizer: torch.optim.Optimizer, *, trainable_only: bool = False) -> dict:
    """Load what ``save_sharded_state`` wrote into ``model`` and ``optimizer`` in place (any number
    of processes, sharded or plain model) and return the ``extra`` dict. Pass the same
    ``trainable_only`` as when saving. Collective."""
    directory = Path(directory)
    missing = [name for name in (".metadata", EXTRA_FILE) if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: not a complete sharded recipe state (no {' or '.join(missing)}); "
                              f"{resume_hint(directory.parent)}")
    extra = _load_small_file(directory / EXTRA_FILE, directory)
    options = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=directory, no_dist=not is_distributed())
    except CheckpointException as e:  # DCP gathers every rank's read failure and raises it on all ranks
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else "unreadable shards"
        raise CheckpointError(f"{directory}: the sharded recipe state is unreadable ({first}); "
                              f"{resume_hint(directory.parent)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=options)
    return extra


def _load_small_file(path: Path, directory: Path) -> dict:
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # torch.load's errors for a damaged file
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: unreadable ({first}); {resume_hint(directory.parent)}") from None


def load_per_rank_state(directory: str | os.PathLike) -> dict | None:
    """This rank's ``per_rank`` dict from ``save_sharded_state``, or None when the checkpoint was
    written by a different number of processes (per-rank state then has no counterpart)."""
    world_size, rank = get_world_size_and_rank()
    path = Path(directory) / _per_rank_file(rank, world_size)
    return _load_small_file(path, Path(directory)) if path.is_file() else None
