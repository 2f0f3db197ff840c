"""Start of sshnpd's session host: wait for the first order before loading the session code.

Why a separate entry point: the host is started with the daemon so that it exists before the
first request (docs/decisions/0024-sessions-outlive-daemon.md), but most devices are idle
most of the time. A host that imported asyncio, ssl and cryptography's bindings at start
cost ~17 MiB of private memory on every idle device; this stage is a bare interpreter
(~2 MiB private) that blocks on the order pipe, and only when the first order (or the end
of the pipe) arrives does it import :mod:`.sessionhost` and hand over what it read
(docs/decisions/0032-sshnpd-idle-memory.md). Nothing here may import beyond ``os``,
``signal`` and ``sys``: ``tests/unit/test_daemon_idle_imports.py`` checks the idle host's
mapped libraries.
"""

from __future__ import annotations

import os
import signal
import sys

MAX_LINE = 64 * 1024  # sessionorder.MAX_LINE, not imported: that module loads cryptography


def ready_line(pid: int) -> bytes:
    """``HostEvent("ready", pid=pid).to_line()``, written by hand (a unit test compares)."""
    return b'{"event":"ready","pid":%d}\n' % pid


def _read_first(fd: int) -> bytes:
    """Bytes up to and including the first newline (or EOF, or more than MAX_LINE)."""
    buf = b""
    while b"\n" not in buf and len(buf) <= MAX_LINE:
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        if not chunk:
            break
        buf += chunk
    return buf


def _stop(signum: int, _frame: object) -> None:
    """SIGTERM/SIGINT before any session: nothing to close, no key written."""
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--help" in args or "-h" in args:
        from .sessionhost import main as full_main
        return full_main(args)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        os.write(1, ready_line(os.getpid()))
    except OSError:
        return 0  # the daemon is gone already
    first = _read_first(0)
    if not first:
        return 0  # the daemon let go of us before any session
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    from .sessionhost import main as full_main
    return full_main(args, pending=first)


if __name__ == "__main__":
    sys.exit(main())
