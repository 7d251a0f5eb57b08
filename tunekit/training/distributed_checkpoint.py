"""Sharded recipe state (model + optimizer + small extras) with torch.distributed.checkpoint.

Each rank writes only its own shards, in parallel, and a later run may load them with a different
number of processes (DCP reshards on load). This is the fast-resume format; HF / PEFT checkpoints
for users are written separately from ``gather_full_state_dict`` on rank 0.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tunekit.training.distributed import get_world_size_and_rank, is_distributed

EXTRA_FILE = "extra.pt"


@contextlib.contextmanager
def _single_process_is_intended():
    # DCP warns whenever no process group exists; for us one process is a supported case
    # (resuming a multi-process run on one device), not an accident.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded_state(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                       extra: dict | None = None) -> None:
    """Write model and optimizer state (sharded or not) to ``directory`` with DCP, plus ``extra``
    (step, data position, RNG state, ...: tensors and plain Python values) from rank 0.
    Collective: call on every rank with the same directory."""
    directory = Path(directory)
    model_state, optim_state = get_state_dict(model, optimizer)
    with _single_process_is_intended():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=directory,
                 no_dist=not is_distributed())
    if get_world_size_and_rank()[1] == 0:
        torch.save(dict(extra or {}), directory / EXTRA_FILE)
    if is_distributed():
        dist.barrier()  # nobody treats the folder as complete before extra.pt exists


def load_sharded_state(directory: str | os.PathLike, model: nn.Module,
                       optimizer: torch.optim.Optimizer) -> dict:
    """Load what ``save_sharded_state`` wrote into ``model`` and ``optimizer`` in place (any number
    of processes, sharded or plain model) and return the ``extra`` dict. Collective."""
    directory = Path(directory)
    if not (directory / ".metadata").is_file() or not (directory / EXTRA_FILE).is_file():
        raise FileNotFoundError(
            f"load_sharded_state: {directory} is not a complete sharded checkpoint "
            f"(needs .metadata and {EXTRA_FILE}); point resume at a folder written by save_sharded_state"
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=directory, no_dist=not is_distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return torch.load(directory / EXTRA_FILE, weights_only=True)
