"""Recognising a torchrun launch that died of a native crash inside torch's gloo process group.

torch 2.13 with gloo on these CPU machines has aborted ranks natively: "terminate called without an
active exception" at interpreter exit (worked around by exit_after_clean_run) and "malloc(): unaligned
tcache chunk detected" (heap corruption), never with a Python traceback of ours. The heap corruption
reproduces without tunekit (scripts/repro_gloo_crash.py: pure torch + torchao, inside
get_model_state_dict's full-state-dict all-gather after an evaluation with unequal work per rank);
scripts/stress_distributed.py measured the current recipes (docs/distributed.md, "Native crash rate
under gloo"). The distributed fixtures start such a launch set over once, from scratch, when the
logs show one of these signatures, and print every retry to stderr; any other failure (a Python
exception, a wrong number) still fails the test at once.
"""

from __future__ import annotations

import sys
import warnings

SIGNATURES = ("malloc(): ", "malloc_consolidate(): ", "double free or corruption", "free(): invalid",
              "terminate called without an active exception", "Signal 11 (SIGSEGV)")


class NativeCrash(AssertionError):
    """A launch failed and its logs show a native crash signature (see the module docstring)."""


def check_launch(returncode: int, logs: str, what: str) -> None:
    """Raise NativeCrash or AssertionError for a failed launch (``returncode`` != 0)."""
    if returncode == 0:
        return
    message = f"{what} failed (rc {returncode}):\n{logs[-6000:]}"
    if crash_signature(logs):
        raise NativeCrash(message)
    raise AssertionError(message)


def crash_signature(logs: str) -> str | None:
    """The first native crash signature found in ``logs`` (None without one)."""
    return next((s for s in SIGNATURES if s in logs), None)


def retry_after_native_crash(build, *args, attempts: int = 2):
    """``build(*args, attempt=0)``; again with ``attempt=1``, ... while it raises NativeCrash, at
    most ``attempts`` times in all (by default: once more).

    Every retry is printed to stderr (signature and the log lines around it) besides the warning,
    so a CI log shows each one even where warnings are summarised or filtered: the retry is kept
    only because of the measured crash rate (docs/distributed.md), and a rising count of retries
    must be visible."""
    for attempt in range(attempts - 1):
        try:
            return build(*args, attempt=attempt)
        except NativeCrash as crash:
            text = str(crash)
            signature = crash_signature(text)
            at = text.find(signature) if signature else -1
            excerpt = text[max(0, at - 1500):at + 500] if at >= 0 else text[-2000:]
            print(f"\n{'=' * 30} NATIVE CRASH RETRY {'=' * 30}\nsignature: {signature!r}\n{excerpt}\n"
                  f"{'=' * 30} starting the torchrun launches over ({attempt + 2} of {attempts}) {'=' * 30}",
                  file=sys.stderr, flush=True)
            warnings.warn(f"native crash ({signature!r}) in a torchrun launch, starting the launches over "
                          f"({attempt + 2} of {attempts}):\n{text[:2000]}")
    return build(*args, attempt=attempts - 1)  # the last attempt: a crash here fails the test
