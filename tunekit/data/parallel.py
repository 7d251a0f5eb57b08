"""One function over the contiguous index ranges of a dataset, in forked worker processes.

Used by the passes that touch every row before training (packing's tokenization, the unpacked
datasets' row validation). Workers are forked, so they inherit the dataset and tokenizer and
nothing is pickled on the way in; each range's result comes back through a pipe. The parent
takes the first range itself. Results are in range order, so the outcome is identical to one
process.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
from collections.abc import Callable
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def _run_to_pipe(fn, lo, hi, conn) -> None:
    try:
        conn.send(fn(lo, hi))
    except BaseException as e:  # noqa: BLE001  (re-raised in the parent)
        conn.send(e)
    finally:
        conn.close()


def map_ranges(fn: Callable[[int, int], T], n: int, num_workers: int = 1) -> list[T]:
    """``[fn(lo, hi) for each of num_workers contiguous ranges of range(n)]`` (one range, in this
    process, when ``num_workers <= 1``, ``n`` is small or ``fork`` is unavailable)."""
    bounds = np.linspace(0, n, max(1, num_workers) + 1).astype(int).tolist()
    children = []
    if num_workers > 1 and n >= 2 * num_workers and "fork" in mp.get_all_start_methods():
        ctx = mp.get_context("fork")
        for lo, hi in itertools.pairwise(bounds[1:]):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_run_to_pipe, args=(fn, lo, hi, send), daemon=True)
            proc.start()
            send.close()
            children.append((proc, recv))
    else:
        bounds = [0, n]
    try:
        results = [fn(bounds[0], bounds[1])]
        for _, recv in children:
            result = recv.recv()
            if isinstance(result, BaseException):
                raise result
            results.append(result)
    finally:
        for proc, recv in children:
            recv.close()
            if proc.is_alive():
                proc.terminate()
            proc.join()
    return results
