"""Ctrl-C or SIGTERM during training: finish the current step, save a checkpoint, exit cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

_SAME_PRESS_SECONDS = 1.0


class StopFlag:
    """Set by the first SIGINT or SIGTERM; the recipe checks ``flag.is_set`` once per step."""

    def __init__(self) -> None:
        self.is_set = False


_MESSAGES = {
    signal.SIGINT: "Ctrl-C: saving a checkpoint after this step; press Ctrl-C again to abort",
    signal.SIGTERM: "SIGTERM: saving a checkpoint after this step; a second signal aborts",
}


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[StopFlag]:
    """Within the context the first SIGINT (Ctrl-C) or SIGTERM only sets the returned flag (and
    prints what happens next); a second one aborts as usual (KeyboardInterrupt for SIGINT,
    SystemExit(143) for SIGTERM). Outside the main thread (where signal handlers cannot be
    installed) the flag simply never gets set.

    SIGTERM is what a scheduler sends before it kills a job (SLURM at the time limit or on
    preemption, then SIGKILL after its KillWait, 30 s by default; Kubernetes likewise), and what
    torchrun's agent forwards to the ranks when it is terminated itself: the step in flight
    finishes and a resumable checkpoint is written instead of the work since the last save
    being lost.

    Under torchrun a signal within a second of the first counts as the same one: on Ctrl-C the
    ranks get the terminal's SIGINT and then the agent's forwarded copy (the agent then allows
    the ranks 30 s to finish the step, save and exit)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    first_at = []
    same_signal = _SAME_PRESS_SECONDS if "TORCHELASTIC_RUN_ID" in os.environ else 0.0

    def handler(signum, frame):
        if flag.is_set:
            if time.monotonic() - first_at[0] < same_signal:
                return
            if signum == signal.SIGTERM:
                raise SystemExit(128 + signal.SIGTERM)
            raise KeyboardInterrupt
        first_at.append(time.monotonic())
        flag.is_set = True
        print(f"\n{_MESSAGES[signum]}", flush=True)

    previous = {signum: signal.signal(signum, handler) for signum in _MESSAGES}
    try:
        yield flag
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
