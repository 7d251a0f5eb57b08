"""Saving a ``step_<N>/`` folder from one process or from every rank of a process group (the
folder format itself: ``tunekit.checkpoint.step_folders``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from tunekit.checkpoint.errors import CheckpointError
from tunekit.checkpoint.step_folders import commit_step_folder, new_tmp_folder
from tunekit.training.process_group import any_rank, barrier, broadcast_from_rank0, get_world_size_and_rank


def save_step_checkpoint(output_dir: str | os.PathLike, step: int, write: Callable[[Path], None], *,
                         keep_last_n: int | None = None, best: dict | None = None) -> Path:
    """Create ``<output_dir>/step_<step>/`` atomically and return its path.

    ``write(folder)`` fills the (temporary) folder; if it raises, the tmp folder is removed and
    the exception propagates, leaving earlier checkpoints untouched. An existing folder of the
    same step is replaced only once the new one is complete. With ``keep_last_n`` older step
    folders beyond the newest ``keep_last_n`` are deleted after the save, except the one ``best``
    names (``{"step": N, "metric": ..., "value": ..., "mode": ...}``: ``keep_best``), which
    ``<output_dir>/best`` and ``best.json`` then point at (``step_folders.link_best``).

    Under a process group every rank calls it: rank 0 creates the tmp folder, ``write`` runs on
    every rank (sharded state from all ranks, HF files from rank 0 only: ``write`` decides; it
    should finish its collectives before writing rank-0-only files), and rank 0 renames the folder
    once every rank has finished writing. If ``write`` fails on any rank, every rank raises (the
    failing one its own error) and nothing is committed: no rank waits forever for another.
    """
    rank = get_world_size_and_rank()[1]
    tmp = broadcast_from_rank0(new_tmp_folder(output_dir, step) if rank == 0 else None)
    error: BaseException | None = None
    try:
        write(tmp)
    except BaseException as e:  # re-raised below, unchanged; the other ranks must hear of it first
        error = e
    if any_rank(error is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error
        raise CheckpointError(f"saving step {step} to {output_dir} failed on another rank (its error is in the "
                              "log); nothing was written")
    final = commit_step_folder(tmp, step, keep_last_n=keep_last_n, best=best) if rank == 0 else None
    barrier()
    return broadcast_from_rank0(final)
