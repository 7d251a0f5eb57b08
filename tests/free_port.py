"""Rendezvous ports for the tests that launch torchrun."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, chosen BELOW the kernel's ephemeral range.

    A port from ``bind(("", 0))`` lies in the ephemeral range, where a torchrun launch that is
    already running (the tests overlap launches) also gets the ports of its gloo listening
    sockets. Between picking such a port and the new launch binding it, the running launch may
    take it; the new launch's store clients then talk to the other launch's gloo, whose ranks
    abort ("terminate called without an active exception", "malloc(): unaligned tcache chunk",
    seen in CI). Ports outside that range are never handed out by ``bind(0)``.
    """
    low = 32768
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    top = min(low, 32768)
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, top - 12000), top)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("free_port: no free port found below the ephemeral range")
