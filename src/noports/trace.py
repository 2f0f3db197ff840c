"""Opt-in timing marks across processes, for benches (``NOPORTS_TRACE=<file>``).

Why: a rendezvous crosses seven processes (client, two atServers, srvd, sshnpd, its session
host, the relay's splice); finding where its milliseconds go needs one clock and one file.
With ``NOPORTS_TRACE`` set, :func:`mark` appends ``<unix time> <pid> <event> <detail>`` to that
file (one ``O_APPEND`` write per line, so lines of different processes do not mix); unset,
it is one global test and costs nothing. bench/agent_tunnels.py reads the file and prints
the per-hop breakdown. Events name the program and the step (``atserver.notify_in``); the
detail is a notification key or a session id, never a value.
"""

from __future__ import annotations

import os
import time

_PATH = os.environ.get("NOPORTS_TRACE") or None
_FD: int | None = None


def enabled() -> bool:
    return _PATH is not None


def mark(event: str, detail: str = "") -> None:
    """Record ``event`` now (no-op unless ``NOPORTS_TRACE`` names a file)."""
    global _FD
    if _PATH is None:
        return
    try:
        if _FD is None:
            _FD = os.open(_PATH, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        line = f"{time.time():.6f} {os.getpid()} {event} {detail}".replace("\n", " ")
        os.write(_FD, (line[:400] + "\n").encode("utf-8", "replace"))
    except OSError:
        pass
