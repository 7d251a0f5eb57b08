"""Ctrl-C during training: finish the current step, save a checkpoint, exit cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

_SAME_PRESS_SECONDS = 1.0


class StopFlag:
    """Set by the first SIGINT; the recipe checks ``flag.is_set`` once per step."""

    def __init__(self) -> None:
        self.is_set = False


@contextlib.contextmanager
def stop_on_sigint(message: str = "Ctrl-C: saving a checkpoint after this step; press Ctrl-C again to abort"
                   ) -> Iterator[StopFlag]:
    """Within the context the first Ctrl-C only sets the returned flag (and prints ``message``);
    a second one raises KeyboardInterrupt as usual. Outside the main thread (where signal
    handlers cannot be installed) the flag simply never gets set.

    Under torchrun a SIGINT within a second of the first counts as the same press: the ranks get
    the terminal's SIGINT and then the agent's forwarded copy (the agent then allows the ranks
    30 s to finish the step, save and exit)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    first_at = []
    same_press = _SAME_PRESS_SECONDS if "TORCHELASTIC_RUN_ID" in os.environ else 0.0

    def handler(signum, frame):
        if flag.is_set:
            if time.monotonic() - first_at[0] < same_press:
                return
            raise KeyboardInterrupt
        first_at.append(time.monotonic())
        flag.is_set = True
        print(f"\n{message}", flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
