"""The daemon's end of its session host: start it, hand it sessions, hear how they went.

Why here and not in :mod:`.service`: spawning is an edge of its own (docs/decisions/
0024-sessions-outlive-daemon.md). The host is a plain ``subprocess.Popen`` - not an asyncio
subprocess, whose transport kills the child when it is closed - in a new session
(``setsid``): neither the daemon's exit, nor a signal to the daemon's process group, nor
systemd's ``KillMode=process`` stop reaches it. Its pipes are attached to the event loop. When
the daemon exits, its end of the order pipe closes and the host drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from typing import Dict, Optional  # noqa: UP035 (3.8)

from .sessionorder import MAX_LINE, HostEvent, OrderError, SessionOrder

log = logging.getLogger("noports.sshnpd")

READY_TIMEOUT_S = 30.0  # a cold start of Python + imports on a slow SD card
START_TIMEOUT_S = 40.0  # key write + local connect + relay connect, each with its own timeout
_DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID")


class HostError(RuntimeError):
    """The session host could not be started or died; the message says which and why."""


def host_argv(log_format: str, verbose: bool, owner: str, authorized_keys: str,
              idle_after: float = 0.0) -> list[str]:
    """``python -m noports.daemon.sessionhost_start ...`` with this daemon's interpreter
    (a bare interpreter until the first order: docs/decisions/0032-sshnpd-idle-memory.md)."""
    argv = [sys.executable, "-m", "noports.daemon.sessionhost_start", "--log-format", log_format,
            "--for", owner, "--authorized-keys", authorized_keys]
    if idle_after > 0:
        argv += ["--idle", f"{idle_after:g}"]
    return [*argv, "-v"] if verbose else argv


def host_env() -> dict[str, str]:
    """The daemon's environment, minus systemd's per-main-process variables, plus the
    directory this very code was imported from first on the path (the host must run the
    daemon's code even if the runtime was replaced since the daemon started)."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    return env


class HostLink:
    """One running session host; :meth:`start` hands it a session and awaits the outcome."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc: Optional[subprocess.Popen[bytes]] = None  # noqa: UP045 (3.8)
        self.pid = 0
        self._writer: Optional[asyncio.WriteTransport] = None  # noqa: UP045
        self._ready: Optional[asyncio.Future[int]] = None  # noqa: UP045
        self._pending: Dict[str, asyncio.Future[str]] = {}  # noqa: UP006 sid -> "" or error
        self.live: set[str] = set()  # started, not ended
        self._reader_task: Optional[asyncio.Task[None]] = None  # noqa: UP045
        self._read_transport: Optional[asyncio.BaseTransport] = None  # noqa: UP045
        self.on_lost = None  # callable(set of sids) when the host died under live sessions
        self.on_idle = None  # callable() when the idle host may be let go (nothing in flight)

    async def spawn(self) -> int:
        """Start the host and wait for its ``ready``; returns its pid."""
        loop = asyncio.get_running_loop()
        try:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                close_fds=True, start_new_session=True, env=host_env(), cwd="/")
        except OSError as exc:
            raise HostError(f"cannot start the session host {self.argv[0]}: {exc}") from None
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        reader = asyncio.StreamReader(limit=MAX_LINE + 1)
        self._read_transport, _protocol = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), proc.stdout)
        self._writer, _protocol = await loop.connect_write_pipe(asyncio.Protocol, proc.stdin)
        self._ready = loop.create_future()
        self._reader_task = asyncio.ensure_future(self._read(reader))
        try:
            self.pid = await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.close()
            raise HostError(f"the session host (pid {proc.pid}) did not start within "
                            f"{READY_TIMEOUT_S:g}s") from None
        if not self.pid:
            self.close()
            raise HostError(f"the session host exited at start (status {proc.poll()}); its "
                            "error is in the lines above") from None
        log.info("session host %d started", self.pid, extra={"event": "session_host"})
        return self.pid

    @property
    def busy(self) -> int:
        """Sessions running or being started (what counts against --max-sessions)."""
        return len(self.live) + len(self._pending)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._writer is not None

    async def start(self, order: SessionOrder) -> str:
        """Hand one session over; "" once it runs, else the error to tell the client."""
        if not self.running:
            return "the session host is not running"
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        self._pending[order.session_id] = fut
        assert self._writer is not None
        self._writer.write(order.to_line())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            return "the session host did not answer"
        finally:
            self._pending.pop(order.session_id, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                log.error("session host %d: line too long", self.pid)
                break
            if not line:
                break
            try:
                ev = HostEvent.from_line(line)
            except OrderError as exc:
                log.error("session host %d: %s", self.pid, exc)
                continue
            self._event(ev)
        self._lost()

    def _event(self, ev: HostEvent) -> None:
        if ev.event == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(ev.pid)
            return
        if ev.event == "idle":  # an order written since then is in _pending: keep the host
            if not self._pending and not self.live and self.on_idle is not None:
                self.on_idle()
            return
        fut = self._pending.get(ev.session_id)
        if ev.event == "started":
            self.live.add(ev.session_id)
            if fut is not None and not fut.done():
                fut.set_result("")
        elif ev.event == "failed":
            if fut is not None and not fut.done():
                fut.set_result(ev.error)
        else:  # ended
            self.live.discard(ev.session_id)

    def _lost(self) -> None:
        """The host's stdout ended: it exited (or closed it). Fail what waits on it."""
        status = self.proc.poll() if self.proc is not None else None
        if self.proc is not None and status is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                status = self.proc.wait(0.5)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_result("the session host exited")
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(0)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        lost, self.live = set(self.live), set()
        log.error("session host %d exited (status %s)%s", self.pid or
                  (self.proc.pid if self.proc else 0), status,
                  f": {len(lost)} session(s) lost" if lost else "",
                  extra={"event": "session_host_exited"})
        if lost and self.on_lost is not None:
            self.on_lost(lost)

    def close(self) -> None:
        """Let go of the host: it finishes its sessions and exits (the daemon's stop)."""
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._read_transport is not None:
            self._read_transport.close()
            self._read_transport = None
        if self.proc is not None and self.proc.poll() is None and self.live:
            log.info("%d session(s) continue in session host %d", len(self.live), self.pid,
                     extra={"event": "sessions_handed_over"})


__all__ = ["HostError", "HostLink", "host_argv", "host_env"]
