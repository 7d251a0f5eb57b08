"""Host-memory allocator setting for training on the CPU."""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_cpu_memory(max_block_bytes: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed blocks of up to ``max_block_bytes`` for reuse.

    Why: glibc serves a large allocation (above a threshold that grows to at most 32 MiB) with its
    own ``mmap`` and unmaps it on free, and trims the heap's free top back to the OS. A training
    step allocates and frees the same large activations every step, so each fresh tensor
    page-faults all of its pages again: on our 2-core VMs a bf16 -> fp32 cast of 8M elements costs
    18 ms with fresh output memory and 2 ms when the memory is reused (docs/benchmarks.md). With
    this setting freed blocks stay in the process and are handed out again. The cost: the
    process's resident memory does not shrink back after its peak.

    Call it once at start-up of a process that trains on the CPU (the recipes do when
    ``device`` is the CPU). It changes only this process's malloc. It does nothing, and returns
    False, where it does not apply: not Linux/glibc, or the user set malloc tunables of their own
    in ``GLIBC_TUNABLES`` (theirs win).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # int arguments: cap at 2^31 - 1; a trim threshold that large means "never trim"
    block = min(max_block_bytes, 2**31 - 1)
    # glibc before 2.35 refuses a threshold above 32 MiB (half its heap size): take what it allows
    if not (mallopt(_M_MMAP_THRESHOLD, block) or mallopt(_M_MMAP_THRESHOLD, min(block, 32 << 20))):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
