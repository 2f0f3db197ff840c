"""Commands and the monitor on ONE authenticated atServer connection (one PKAM login).

Why: the controller agent (docs/agent.md) serves many tunnels for one client atSign; each
``AtClient`` keeps a command connection and a monitor connection, each logged in once. An
atServer keeps dispatching verbs on a connection after ``monitor`` (the official one does:
docs/decisions/0031-one-atserver-connection.md), so one connection can carry both: replies
(``data:``/``error:``) come back in the order the commands were sent, and ``notification:``
lines are pushed between them at any time, even between a command and its reply.

Two layers, like the rest of the client (:mod:`noports.atprotocol.wire` under
:mod:`noports.atclient.aio`):

* :class:`Demux` (sans-IO): bytes in, events out: the answer to the oldest pending command,
  a pushed notification line, or a stray reply (nothing was pending: the stream is out of
  step). ``monitor`` itself has no reply unless it fails, so a pending monitor is settled by
  the first ``data:`` after it (the answer to the next command) and answered by an ``error:``.
* :class:`MuxClient` (asyncio): an :class:`~noports.atclient.aio.AtClient` whose ``command``
  and ``monitor`` share one connection with a reader task; a cut connection is opened again
  once (one re-login), shared by the commands and the monitor, and the monitor resumes from
  the last ``epochMillis`` it saw (the base :class:`~noports.atclient.aio.Monitor` logic).

Only one command is on the wire at a time, and after ``monitor`` the next one waits
:data:`MONITOR_SETTLE_S`: the official server runs everything it has buffered up to a newline
as ONE command (docs/reference/atprotocol.md#request-framing), so two commands must never reach
it in one read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from noports.atclient import e2e
from noports.atclient.aio import (
    AtClient,
    AtConnectError,
    AtProtocolError,
    AtTimeoutError,
    Monitor,
    _bounded,
    _now_ms,
    _Stream,
    _verb,
)
from noports.atclient.connection import parse_error
from noports.atprotocol.wire import FramingError, Reply, ReplyFramer

__all__ = ["Answer", "Demux", "MuxClient", "Pushed", "Stray"]

log = logging.getLogger(__name__)

#: wait after writing ``monitor`` before the next command (see the module docstring)
MONITOR_SETTLE_S = 0.05
#: notification lines buffered for a slow monitor consumer; past it the connection is
#: dropped and the monitor replays from its cursor (nothing lost, memory bounded)
NOTE_BACKLOG = 4096
READ_CHUNK = 65536


# --- sans-IO ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """The reply to the command registered as `token`; None: a monitor that was accepted."""

    token: Any
    reply: Reply | None


@dataclass(frozen=True)
class Pushed:
    """A ``notification:`` line (live, replayed or stats)."""

    reply: Reply


@dataclass(frozen=True)
class Stray:
    """A reply with no command pending: the connection is out of step and must be closed."""

    reply: Reply


class Demux:
    """Splits one connection's byte stream into command answers and pushed notifications.

    Call :meth:`expect` when a command is written (``monitor=True`` for ``monitor``) and
    :meth:`feed` with what is read. Prompts (``@alice@``, glued in front of the next line by
    the official server, absent on ours) are dropped.
    """

    def __init__(self, framer: ReplyFramer | None = None) -> None:
        self.framer = framer or ReplyFramer()
        self._pending: deque[tuple[Any, bool]] = deque()

    @property
    def pending(self) -> list[Any]:
        return [pending[0] for pending in self._pending]

    def expect(self, token: Any, *, monitor: bool = False) -> None:
        self._pending.append((token, monitor))

    def feed(self, data: bytes) -> list[Answer | Pushed | Stray]:
        """Events completed by `data`, in stream order (FramingError: over-long line)."""
        return self.replies(self.framer.feed(data))

    def replies(self, replies: list[Reply]) -> list[Answer | Pushed | Stray]:
        out: list[Answer | Pushed | Stray] = []
        for r in replies:
            if r.kind == "prompt":
                continue
            if r.kind == "notification":
                out.append(Pushed(r))
                continue
            # a monitor answers only when it fails: anything but an error is the next
            # command's reply, so the monitor before it was accepted
            while self._pending and self._pending[0][1] and r.kind != "error":
                out.append(Answer(self._pending.popleft()[0], None))
            if not self._pending:
                out.append(Stray(r))
                continue
            out.append(Answer(self._pending.popleft()[0], r))
        return out

    def drain(self) -> list[Any]:
        """Forget every pending command (the connection is gone); returns their tokens."""
        tokens = self.pending
        self._pending.clear()
        return tokens


def answer_text(reply: Reply | None, cmd: str, peer: str) -> str:
    """``data:`` -> its text; ``error:`` -> AtProtocolError; anything else -> AtProtocolError."""
    if reply is None:
        return ""
    if reply.kind == "data":
        return reply.text
    if reply.kind == "error":
        raise parse_error(reply.text)
    raise AtProtocolError("", f"unexpected reply from {peer} to {_verb(cmd)!r}: "
                          f"{reply.line[:80]!r}")


# --- asyncio edge -----------------------------------------------------------------------------

class _Conn:
    """One authenticated connection, its reader task and its demultiplexer."""

    def __init__(self, stream: _Stream, backlog: int = NOTE_BACKLOG) -> None:
        self.stream = stream
        self.peer = stream.peer
        self.demux = Demux(stream.framer)
        self.lock = asyncio.Lock()  # one command on the wire at a time
        self.notes: asyncio.Queue[Reply | None] = asyncio.Queue(backlog)
        self.want_notes = False
        self.error: BaseException | None = None
        self.dead = False
        early = list(stream._replies)  # what authentication read past its last reply
        stream._replies.clear()
        try:
            self._dispatch(self.demux.replies(early))  # prompts; anything else is stray
        except AtProtocolError:
            stream.close()
            raise
        self.task = asyncio.get_running_loop().create_task(self._read(),
                                                           name=f"mux reader {self.peer}")

    def _dispatch(self, events: list[Answer | Pushed | Stray]) -> None:
        for ev in events:
            if isinstance(ev, Answer):
                if not ev.token.done():
                    ev.token.set_result(ev.reply)
            elif isinstance(ev, Pushed):
                if not self.want_notes:
                    continue  # no monitor consumer (it was closed): drop
                try:
                    self.notes.put_nowait(ev.reply)
                except asyncio.QueueFull:
                    raise AtProtocolError("", f"the monitor is {self.notes.maxsize} "
                                          "notifications behind; reconnecting") from None
            else:
                raise AtProtocolError("", f"{self.peer} sent a reply nobody asked for: "
                                      f"{ev.reply.line[:80]!r}")

    async def _read(self) -> None:
        err: BaseException = AtConnectError(f"connection to {self.peer} closed")
        try:
            while True:
                try:
                    chunk = await self.stream.reader.read(READ_CHUNK)
                except (OSError, ssl.SSLError) as exc:
                    err = AtConnectError(f"connection to {self.peer} failed: {exc}")
                    return
                if not chunk:
                    err = AtConnectError(f"{self.peer} closed the connection")
                    return
                try:
                    events = self.demux.feed(chunk)
                except FramingError as exc:
                    err = AtProtocolError("", f"{self.peer} sent an over-long line: {exc}")
                    return
                try:
                    self._dispatch(events)
                except AtProtocolError as exc:
                    err = exc
                    return
        except asyncio.CancelledError:
            err = AtConnectError(f"connection to {self.peer} closed")
            raise
        finally:
            self.fail(err)

    def fail(self, exc: BaseException) -> None:
        """The connection is unusable: close it, fail every waiter, wake the monitor."""
        if self.dead:
            return
        self.dead = True
        self.error = exc
        self.stream.close()
        # a command whose connection died is safe to re-send (AtClient.command(retry=True))
        # whatever killed it; the monitor reads the real cause from `error`
        lost = exc if isinstance(exc, AtConnectError) else AtConnectError(
            f"connection to {self.peer} dropped: {exc}")
        for fut in self.demux.drain():
            if not fut.done():
                fut.set_exception(lost)
                fut.exception()  # a waiter that timed out is not told twice
        while True:  # the sentinel must get through: unhandled lines are replayed anyway
            try:
                self.notes.put_nowait(None)
                break
            except asyncio.QueueFull:
                self.notes.get_nowait()
        if self.task is not asyncio.current_task():
            self.task.cancel()

    async def _send(self, cmd: str, fut: asyncio.Future[Reply | None], timeout: float,
                    *, monitor: bool = False) -> None:
        if self.dead:  # raced with a cut: the caller may re-send on a new connection
            raise AtConnectError(f"connection to {self.peer} is closed")
        self.stream.send_nowait(cmd)
        self.demux.expect(fut, monitor=monitor)
        try:
            await _bounded(self.stream.writer.drain(), timeout)
        except asyncio.TimeoutError:
            self.fail(AtTimeoutError(f"{self.peer} is not reading (send timed out)"))
            raise self.error from None  # type: ignore[misc]
        except (OSError, ssl.SSLError) as exc:
            self.fail(AtConnectError(f"connection to {self.peer} failed: {exc}"))
            raise self.error from None  # type: ignore[misc]

    async def _wait(self, fut: asyncio.Future[Reply | None], cmd: str,
                    timeout: float) -> Reply | None:
        try:
            return await _bounded(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            # a late reply would answer the next command: this connection is done
            self.fail(AtTimeoutError(f"no reply from {self.peer} to {_verb(cmd)!r} within "
                                     f"{timeout:g}s"))
            raise self.error from None  # type: ignore[misc]

    async def request(self, cmd: str, timeout: float) -> str:
        loop = asyncio.get_running_loop()
        async with self.lock:
            fut: asyncio.Future[Reply | None] = loop.create_future()
            await self._send(cmd, fut, timeout)
            reply = await self._wait(fut, cmd, timeout)
        return answer_text(reply, cmd, self.peer)

    async def start_monitor(self, cmd: str, timeout: float, settle: float) -> None:
        """Send ``monitor`` and prove it was accepted: a ``noop:0`` after it is answered
        ``data:ok`` only once the monitor was taken as a command of its own."""
        loop = asyncio.get_running_loop()
        async with self.lock:
            self.want_notes = True
            mfut: asyncio.Future[Reply | None] = loop.create_future()
            await self._send(cmd, mfut, timeout, monitor=True)
            await asyncio.sleep(settle)
            probe: asyncio.Future[Reply | None] = loop.create_future()
            await self._send("noop:0", probe, timeout)
            refused = await self._wait(mfut, "monitor", timeout)
            if refused is not None:
                # the probe's own answer follows (ours) or never comes (two commands run as
                # one): either way the stream is not worth keeping
                self.fail(AtConnectError(f"monitor refused by {self.peer}"))
                answer_text(refused, "monitor", self.peer)
            answer_text(await self._wait(probe, "noop:0", timeout), "noop:0", self.peer)

    def close(self) -> None:
        self.fail(AtConnectError(f"connection to {self.peer} closed"))


class MuxClient(AtClient):
    """An AtClient whose commands and single monitor share one connection (one login).

    ``logins`` counts the PKAM logins it made (1 + one per reconnect).
    """

    def __init__(self, *args: Any, settle_s: float = MONITOR_SETTLE_S,
                 backlog: int = NOTE_BACKLOG, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.settle_s = settle_s
        self.backlog = backlog
        self.logins = 0
        self._conn: _Conn | None = None
        self._connect_lock = asyncio.Lock()
        self._monitor: MuxMonitor | None = None

    @classmethod
    async def connect(cls, *args: Any, **kw: Any) -> MuxClient:  # type: ignore[override]
        client = cls(*args, **kw)
        await client.connection()
        return client

    async def connection(self, fresh: bool = False) -> _Conn:
        """The live connection, or a new one (one login) when there is none or it died."""
        async with self._connect_lock:
            conn = self._conn
            if conn is not None and not conn.dead:
                return conn
            if self._closed:
                raise AtConnectError("client is closed")
            if conn is not None:
                log.info("%s: reconnecting to its atServer", self.atsign)
            stream = await self._open_authenticated(fresh=fresh or conn is not None)
            self.logins += 1
            self._conn = _Conn(stream, self.backlog)
            return self._conn

    async def command(self, cmd: str, *, timeout: float | None = None,
                      retry: bool = False) -> str:
        if self._closed:
            raise AtConnectError("client is closed")
        for attempt in (0, 1):
            conn = await self.connection()
            try:
                return await conn.request(cmd, timeout or self.timeout)
            except AtConnectError:
                if not retry or attempt:
                    raise
                log.info("%s: connection lost during %s; retrying once", self.atsign,
                         _verb(cmd))
        raise AssertionError("unreachable")

    def monitor(self, regex: str | None = ".*", since_ms: int | None = None, *,
                self_notifications: bool = False, heartbeat_s: float = 30.0,
                heartbeat_timeout_s: float = 10.0, backoff_base_s: float = 0.25,
                backoff_max_s: float = 30.0, queue_size: int = 1024,
                on_refused: Callable[[AtProtocolError], float | None] | None = None
                ) -> MuxMonitor:
        """The connection's one monitor (a second one would change the first one's regex
        on the server)."""
        if self._closed:
            raise AtConnectError("client is closed")
        if self._monitor is not None and not self._monitor._closed:
            raise RuntimeError("a MuxClient has one monitor; close it before starting another")
        m = MuxMonitor(self, regex, since_ms, self_notifications=self_notifications,
                       heartbeat_s=heartbeat_s, heartbeat_timeout_s=heartbeat_timeout_s,
                       backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s,
                       queue_size=queue_size, on_refused=on_refused)
        self._monitors.add(m)
        self._monitor = m
        return m

    async def close(self) -> None:
        self._closed = True
        for m in list(self._monitors):
            await m.aclose()
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await _bounded(self._conn.stream.writer.wait_closed(), 1.0)


class MuxMonitor(Monitor):
    """:class:`~noports.atclient.aio.Monitor` on the client's shared connection: the same
    replay cursor, de-duplication, decryption and back-off; only the session differs."""

    client: MuxClient

    async def _session(self, fresh: bool) -> None:
        client = self.client
        conn = await client.connection(fresh=fresh)
        if self._started_ms is None:
            self._started_ms = _now_ms()
        elif self._cursor is None:
            self._cursor = self._started_ms
        since = self._replay_from()
        await conn.start_monitor(e2e.monitor_command(self.regex, since, self.self_notifications),
                                 client.timeout, client.settle_s)
        self.connects += 1
        self._ready.set()
        log.info("%s: monitor started on the shared connection%s", client.atsign,
                 "" if since is None else " (replaying)")
        while not self._closed:
            try:
                reply = await _bounded(conn.notes.get(), self.heartbeat_s)
            except asyncio.TimeoutError:
                await conn.request("noop:0", self.heartbeat_timeout_s)  # raises when dead
                continue
            if reply is None:
                raise conn.error or AtConnectError("monitor connection closed")
            parsed = e2e.parse_monitor_line(reply.line)
            if parsed.kind == "notification" and parsed.notification is not None:
                await self._handle(parsed.notification)
            elif parsed.kind == "other":
                log.debug("%s: ignoring an unexpected monitor line", client.atsign)

    async def aclose(self) -> None:
        conn = self.client._conn
        if conn is not None:
            conn.want_notes = False
        await super().aclose()
