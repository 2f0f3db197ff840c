"""Byte pumps between two endpoints, with real backpressure, inside one asyncio loop.

Two implementations of the same contract (bytes both ways, half-close propagated,
byte counts, bounded buffering):

``"protocol"``
    asyncio :class:`~asyncio.BufferedProtocol` on each socket. Reads go straight into a
    256 KiB buffer shared by every splice on the thread (reads are never concurrent in one
    loop, and the transport copies whatever it cannot send at once), so an idle pair holds
    no read buffer at all. When the peer transport's write buffer passes the high-water
    mark its protocol gets ``pause_writing`` and we ``pause_reading`` the source;
    ``resume_writing`` undoes it. Per direction at most ``high_water + read_size`` bytes
    are ever buffered in the relay. Supports per-direction transforms (AES-CTR) and pipes
    (stdio), so the client pump uses it too.

``"os_splice"``
    Linux ``splice(2)`` through a pipe per direction, driven by ``loop.add_reader`` /
    ``add_writer`` on the raw non-blocking fds. Bytes never enter user space; the bound
    per direction is the pipe capacity (1 MiB, kernel memory). No transforms.

:data:`DEFAULT_MODE` is whichever measured faster (see docs/relay.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Callable as _TypingCallable  # noqa: UP035 (3.8: abc generics are not subscriptable)
from typing import Literal

log = logging.getLogger(__name__)

Transform = _TypingCallable[[bytes], bytes]
SpliceMode = Literal["protocol", "os_splice"]


class FlowTransform:
    """A per-direction transform that also has a say at end of stream.

    Why: an authenticated stream cipher must send its end-of-stream frame before the
    half-close (so the peer can tell EOF from truncation), and the receiving side must check
    that frame arrived. ``at_eof`` returns bytes to write before the EOF; raising from it
    aborts the whole splice, so the application sees a reset rather than a clean end.
    """

    __slots__ = ("data", "at_eof")

    def __init__(self, data: Transform, at_eof: Callable[[], bytes]) -> None:
        self.data = data
        self.at_eof = at_eof

    def __call__(self, chunk: bytes) -> bytes:
        return self.data(chunk)


READ_SIZE = 1024 * 1024
HIGH_WATER = 256 * 1024
PIPE_SIZE = 1024 * 1024
HAS_OS_SPLICE = hasattr(os, "splice") and sys.platform.startswith("linux")
#: Measured default (docs/relay.md): os.splice moves bytes without copying them into Python.
DEFAULT_MODE: SpliceMode = "os_splice" if HAS_OS_SPLICE else "protocol"

# Python < 3.12 copies unsent bytes into the transport's own bytearray, so the shared read
# buffer may be reused immediately. 3.12+ queues memoryviews: if anything stays queued we
# hand the old buffer to the transport and allocate a fresh one.
_WRITE_COPIES = sys.version_info < (3, 12)
_tls = threading.local()


def _shared_view() -> memoryview:
    view = getattr(_tls, "view", None)
    if view is None:
        view = _tls.view = memoryview(bytearray(READ_SIZE))
    return view


def _renew_shared_view() -> None:
    _tls.view = memoryview(bytearray(READ_SIZE))


# ------------------------------------------------------------------------- base class


class Splice:
    """A running pump between endpoint A and endpoint B (A->B and B->A flows)."""

    mode: str = "?"

    def __init__(self, on_close: Callable[[Splice], None] | None, linger: float) -> None:
        self._on_close = on_close
        self._linger = linger
        self.started_at = time.monotonic()
        self.ended_at: float | None = None
        self.closed = False
        self.close_reason = ""
        #: why the pump ended badly, and on which end ("a"/"b"): a rejected end of stream
        #: (truncation) or a connection lost with an error; None for a clean end. The owner
        #: turns it into its own message (the client: ``sshnp: error: tunnel: ...``).
        self.failure: BaseException | None = None
        self.failed_end: str | None = None
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # set when bytes handed on after close have reached their end (stdio copy threads)
        self._drains: list[asyncio.Future[None]] = []

    @property
    def bytes_ab(self) -> int:
        raise NotImplementedError

    @property
    def bytes_ba(self) -> int:
        raise NotImplementedError

    def buffered_bytes(self) -> int:
        """Bytes read from one side and not yet handed to the kernel of the other."""
        raise NotImplementedError

    def activity(self) -> int:
        """Monotonic counter of relayed bytes, for idle detection by sampling."""
        return self.bytes_ab + self.bytes_ba

    def close(self, reason: str = "closed") -> None:
        """Stop pumping; flush what is buffered (bounded by ``linger``), then close."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.ended_at = time.monotonic()
        self._shutdown()
        cb, self._on_close = self._on_close, None
        if cb is not None:
            try:
                cb(self)
            except Exception:  # a buggy observer must not break the loop
                log.exception("splice on_close callback failed")

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)
        if self._drains:
            await asyncio.shield(asyncio.gather(*self._drains))

    def _finished(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _fail_with(self, end: str | None, exc: BaseException) -> None:
        if self.failure is None and not self.closed:
            self.failure, self.failed_end = exc, end

    def _shutdown(self) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------- protocol-based pump


class _Flow:
    """One direction: bytes read from ``src`` are (transformed and) written to ``dst``."""

    __slots__ = ("splice", "src", "dst", "transform", "nbytes", "eof", "wired", "early",
                 "early_eof", "src_name")

    def __init__(self, splice: ProtocolSplice, transform: Transform | None,
                 src_name: str = "?") -> None:
        self.splice = splice
        self.src_name = src_name  # "a" or "b": which end this flow reads
        self.src: asyncio.BaseTransport | None = None
        self.dst: asyncio.WriteTransport | None = None
        self.transform = transform
        self.nbytes = 0
        self.eof = False
        # Bytes (and an EOF) that arrived before both ends were wired; see ``hold_early``.
        self.wired = False
        self.early: bytearray | None = None
        self.early_eof = False

    def hold_early(self, transport: asyncio.BaseTransport | None, data: bytes | memoryview,
                   eof: bool = False) -> None:
        """Keep bytes read before ``_begin`` and stop the source again.

        Why: Python <= 3.11.2 (Debian 12's) ignores ``pause_reading()`` called from
        ``connection_made`` - the transport adds its reader afterwards anyway - so a source
        can deliver data before its destination exists. Dropping it would corrupt the
        stream. A resume/pause pair re-syncs the transport's paused flag with its reader.
        """
        if data:
            if self.early is None:
                self.early = bytearray()
            self.early += data
        self.early_eof = self.early_eof or eof
        if transport is not None and not transport.is_closing():
            transport.resume_reading()  # type: ignore[attr-defined]
            transport.pause_reading()  # type: ignore[attr-defined]

    def release_early(self) -> None:
        """Mark the flow wired and forward what ``hold_early`` kept, in order."""
        self.wired = True
        early, self.early = self.early, None
        if early:
            self.forward(bytes(early))
        if self.early_eof:
            self.on_eof()

    def forward(self, data: bytes | memoryview) -> None:
        self.nbytes += len(data)
        dst = self.dst
        if self.transform is not None:
            # even with nobody to write to: the cipher must see every byte, or the peer's
            # end-of-stream frame behind them would look missing
            data = self.transform(bytes(data))
            if not data:
                return
        if dst is None or dst.is_closing():
            return
        dst.write(data)

    def on_eof(self) -> None:
        if self.eof:
            return
        self.eof = True
        dst = self.dst
        at_eof = getattr(self.transform, "at_eof", None)
        if at_eof is not None:
            try:
                tail = at_eof()
            except Exception as exc:  # noqa: BLE001 - any failure means: do not trust the end
                # the owner names it (daemon: "ended (aborted: ...)", client: sshnp: error:)
                log.info("splice: end of stream rejected (%s); aborting", exc)
                self.splice._fail_with(self.src_name, exc)
                self.splice.abort(f"aborted: end of stream rejected ({exc})")
                return
            if tail and dst is not None and not dst.is_closing():
                dst.write(tail)
        if dst is not None and not dst.is_closing() and dst.can_write_eof():
            dst.write_eof()
        self.splice._flow_eof()

    def pause_src(self) -> None:
        src = self.src
        if src is not None and not src.is_closing():
            src.pause_reading()  # type: ignore[attr-defined]

    def resume_src(self) -> None:
        src = self.src
        if src is not None and not src.is_closing():
            src.resume_reading()  # type: ignore[attr-defined]


class _SockEnd(asyncio.BufferedProtocol):
    """A socket that is the source of ``inflow`` and the destination of ``outflow``."""

    __slots__ = ("splice", "inflow", "outflow", "transport", "name")

    def __init__(self, splice: ProtocolSplice, inflow: _Flow | None, outflow: _Flow | None,
                 name: str = "?"):
        self.splice = splice
        self.inflow = inflow
        self.outflow = outflow
        self.transport: asyncio.Transport | None = None
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]  # until both ends are wired
        if hasattr(transport, "set_write_buffer_limits"):
            transport.set_write_buffer_limits(high=self.splice.high_water)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _shared_view()

    def buffer_updated(self, nbytes: int) -> None:
        flow = self.inflow
        if flow is None:
            return
        if not flow.wired:
            flow.hold_early(self.transport, _shared_view()[:nbytes])
            return
        flow.forward(_shared_view()[:nbytes])
        if not _WRITE_COPIES and flow.transform is None and flow.dst is not None \
                and flow.dst.get_write_buffer_size():
            _renew_shared_view()

    def data_received(self, data: bytes) -> None:  # pipes (stdin) use plain Protocol calls
        flow = self.inflow
        if flow is None:
            return
        if not flow.wired:
            flow.hold_early(self.transport, data)
            return
        flow.forward(data)

    def eof_received(self) -> bool:
        flow = self.inflow
        if flow is not None:
            if flow.wired:
                flow.on_eof()
            else:
                flow.hold_early(None, b"", eof=True)
        return True  # keep the write side open: half-close

    def pause_writing(self) -> None:
        if self.outflow is not None:
            self.outflow.pause_src()

    def resume_writing(self) -> None:
        if self.outflow is not None:
            self.outflow.resume_src()

    def connection_lost(self, exc: Exception | None) -> None:
        inflow = self.inflow
        if inflow is not None and inflow.eof and isinstance(exc, _WRITE_GONE):
            # It finished sending (a clean EOF) and then closed outright, so our last bytes
            # to it had nowhere to go (ssh gone after its disconnect, sshd after its EOF).
            # The other direction still ends properly: read it to its end-of-stream frame.
            self.splice._consumer_gone(self)
            return
        self.splice._end_lost(self, exc)


#: write errors meaning "the reader went away", not "the stream broke"
_WRITE_GONE = (BrokenPipeError, ConnectionResetError)


class _PipeEnd(_SockEnd, asyncio.Protocol):
    """Plain-Protocol variant for pipe transports, which do not drive BufferedProtocol."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.inflow is not None:
            transport.pause_reading()  # type: ignore[attr-defined]
        if hasattr(transport, "set_write_buffer_limits"):
            transport.set_write_buffer_limits(high=self.splice.high_water)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        # A pipe transport closes itself after EOF (stdin) or after write_eof (stdout);
        # that ends one direction only, the other may still be flowing.
        flow = self.inflow or self.outflow
        if exc is None and flow is not None and (flow.eof or flow.early_eof):
            self.splice._end_gone()
        elif self.inflow is None and (exc is None or isinstance(exc, _WRITE_GONE)):
            # stdout's reader (ssh) closed it: ssh is exiting, and its stdin EOF follows.
            # Not a broken tunnel: finish the other direction (end-of-stream frame).
            self.splice._consumer_gone(self)
        else:
            self.splice._end_lost(self, exc)


class ProtocolSplice(Splice):
    """Splice on asyncio transports (sockets or pipes); see module docstring."""

    mode = "protocol"

    def __init__(self, *, transform_ab: Transform | None = None,
                 transform_ba: Transform | None = None, high_water: int = HIGH_WATER,
                 on_close: Callable[[Splice], None] | None = None, linger: float = 10.0):
        super().__init__(on_close, linger)
        self.high_water = high_water
        self.ab = _Flow(self, transform_ab, "a")
        self.ba = _Flow(self, transform_ba, "b")
        self._ends: list[_SockEnd] = []
        self._alive = 0
        self._abort_timer: asyncio.TimerHandle | None = None

    @property
    def bytes_ab(self) -> int:
        return self.ab.nbytes

    @property
    def bytes_ba(self) -> int:
        return self.ba.nbytes

    def buffered_bytes(self) -> int:
        return sum(e.transport.get_write_buffer_size() for e in self._ends
                   if e.transport is not None and hasattr(e.transport, "get_write_buffer_size"))

    def _add(self, end: _SockEnd) -> None:
        self._ends.append(end)
        self._alive += 1

    def _begin(self, head_ab: bytes, head_ba: bytes, eof_a: bool, eof_b: bool) -> None:
        """Both ends are connected: push early bytes, then start reading."""
        self.ab.wired = self.ba.wired = True
        if head_ab:
            self.ab.forward(head_ab)
        if head_ba:
            self.ba.forward(head_ba)
        self.ab.release_early()
        self.ba.release_early()
        if eof_a:
            self.ab.on_eof()
        if eof_b:
            self.ba.on_eof()
        if self.closed:
            return
        for flow in (self.ab, self.ba):
            if not flow.eof and flow.src is not None and not flow.src.is_closing():
                # do not override backpressure already applied by the heads
                dst = flow.dst
                if dst is None or dst.get_write_buffer_size() <= self.high_water:
                    flow.resume_src()

    def _flow_eof(self) -> None:
        if self.ab.eof and self.ba.eof:
            self.close("clean")  # both ends half-closed (and their end frames checked)

    def _end_lost(self, end: _SockEnd, exc: Exception | None) -> None:
        if not self.closed:
            if exc is not None:
                self._fail_with(end.name, exc)
            # a real cut (a reset, or a close before the EOF): "aborted", as the owner's log says
            self.close(f"aborted: connection lost: {exc}" if exc
                       else "aborted: connection closed")
        self._end_gone()

    def _consumer_gone(self, end: _SockEnd) -> None:
        """``end`` will take no more bytes, but nothing broke: drop what flows to it, keep
        reading the other direction to its end (bounded by ``linger``)."""
        self._end_gone()
        if self.closed:
            return
        flow = end.outflow
        if flow is not None:
            flow.resume_src()  # a paused source would never reach its EOF
        if self._abort_timer is None:
            self._abort_timer = asyncio.get_running_loop().call_later(
                self._linger, self.abort, "aborted: the other side did not finish in time")

    def _end_gone(self) -> None:
        self._alive -= 1
        if self._alive <= 0:
            if self._abort_timer is not None:
                self._abort_timer.cancel()
                self._abort_timer = None
            self._finished()

    def _shutdown(self) -> None:
        for end in self._ends:
            t = end.transport
            if t is not None and not t.is_closing():
                t.close()  # flushes its write buffer first
        if self._alive > 0:
            if self._abort_timer is not None:
                self._abort_timer.cancel()
            self._abort_timer = asyncio.get_running_loop().call_later(self._linger, self.abort)

    def abort(self, reason: str = "aborted") -> None:
        """Drop everything now (buffered bytes are lost); TCP peers see a reset, not an EOF."""
        if not self.closed:
            self.close(reason)
        for end in self._ends:
            t = end.transport
            if t is not None:
                sock = t.get_extra_info("socket")
                if sock is None and t.is_closing():
                    continue  # a pipe transport must not be closed twice (asyncio < 3.13)
                if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                # a read pipe transport (stdin) has no abort(); its close() drops nothing
                getattr(t, "abort", t.close)()


# -------------------------------------------------------------------- os.splice pump


class _PipeFlow:
    """One direction of an os.splice pump: src socket -> pipe -> dst socket."""

    __slots__ = ("sp", "src", "dst", "dst_sock", "pr", "pw", "inpipe", "nbytes", "eof", "done")

    BUDGET = 16  # splice round trips per callback: keeps one hot pair from starving others

    def __init__(self, sp: OsSplice, src: socket.socket, dst: socket.socket) -> None:
        self.sp = sp
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.dst_sock = dst
        self.pr, self.pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # pipe-max-size lowered by the admin: keep the default 64 KiB
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.pw, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.inpipe = 0
        self.nbytes = 0
        self.eof = False
        self.done = False

    def readable(self) -> None:
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        try:
            for _round in range(self.BUDGET):
                try:
                    n = os.splice(self.src, self.pw, PIPE_SIZE, flags=flags)
                except BlockingIOError:
                    return
                if n == 0:
                    self.eof = True
                    self.sp._loop.remove_reader(self.src)
                    if self.inpipe == 0:
                        self._finish()
                    else:
                        self.sp._loop.add_writer(self.dst, self.writable)
                    return
                self.inpipe += n
                self.nbytes += n
                if not self._drain():
                    self.sp._loop.remove_reader(self.src)
                    self.sp._loop.add_writer(self.dst, self.writable)
                    return
        except OSError as exc:
            self.sp._fail(exc)

    def writable(self) -> None:
        try:
            if not self._drain():
                return
        except OSError as exc:
            self.sp._fail(exc)
            return
        self.sp._loop.remove_writer(self.dst)
        if self.eof:
            self._finish()
        elif not self.sp.closed:
            self.sp._loop.add_reader(self.src, self.readable)

    def _drain(self) -> bool:
        """Move the pipe's bytes to dst; True once the pipe is empty."""
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        while self.inpipe:
            try:
                n = os.splice(self.pr, self.dst, self.inpipe, flags=flags)
            except BlockingIOError:
                return False
            self.inpipe -= n
        return True

    def _finish(self) -> None:
        self.done = True
        with contextlib.suppress(OSError):
            self.dst_sock.shutdown(socket.SHUT_WR)  # propagate the half-close
        self.sp._flow_done()

    def close_pipe(self) -> None:
        for fd in (self.pr, self.pw):
            with contextlib.suppress(OSError):
                os.close(fd)


class OsSplice(Splice):
    """Splice two raw sockets with ``os.splice`` through per-direction pipes (Linux)."""

    mode = "os_splice"

    def __init__(self, sock_a: socket.socket, sock_b: socket.socket, *,
                 on_close: Callable[[Splice], None] | None = None, linger: float = 10.0):
        super().__init__(on_close, linger)
        self._loop = asyncio.get_running_loop()
        self._a, self._b = sock_a, sock_b
        self.ab = _PipeFlow(self, sock_a, sock_b)
        self.ba = _PipeFlow(self, sock_b, sock_a)

    @property
    def bytes_ab(self) -> int:
        return self.ab.nbytes

    @property
    def bytes_ba(self) -> int:
        return self.ba.nbytes

    def buffered_bytes(self) -> int:
        return self.ab.inpipe + self.ba.inpipe

    def _start(self) -> None:
        self._loop.add_reader(self.ab.src, self.ab.readable)
        self._loop.add_reader(self.ba.src, self.ba.readable)

    def _flow_done(self) -> None:
        if self.ab.done and self.ba.done:
            self.close("clean")

    def _fail(self, exc: OSError) -> None:
        self._fail_with(None, exc)
        self.close(f"connection lost: {exc}")

    def _shutdown(self) -> None:
        for fd in (self._a.fileno(), self._b.fileno()):
            if fd >= 0:
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
        self.ab.close_pipe()
        self.ba.close_pipe()
        self._a.close()
        self._b.close()
        self._finished()


# ------------------------------------------------------------------------ entry points


async def splice_sockets(sock_a: socket.socket, sock_b: socket.socket, *,
                         mode: SpliceMode | None = None, head_ab: bytes = b"",
                         head_ba: bytes = b"", transform_ab: Transform | None = None,
                         transform_ba: Transform | None = None, high_water: int = HIGH_WATER,
                         on_close: Callable[[Splice], None] | None = None,
                         linger: float = 10.0) -> Splice:
    """Start pumping between two connected sockets; returns at once (pump runs in loop).

    ``head_ab``/``head_ba`` are bytes already read from A/B (after an auth line) that must
    reach the other side first. The splice owns both sockets from here on.
    """
    mode = mode or (DEFAULT_MODE if transform_ab is None and transform_ba is None
                    else "protocol")
    loop = asyncio.get_running_loop()
    sock_a.setblocking(False)
    sock_b.setblocking(False)
    if mode == "os_splice":
        if not HAS_OS_SPLICE:
            raise ValueError("os_splice mode needs Linux and Python >= 3.10")
        if transform_ab is not None or transform_ba is not None:
            raise ValueError("os_splice mode cannot apply transforms")
        sp = OsSplice(sock_a, sock_b, on_close=on_close, linger=linger)
        sp.ab.nbytes, sp.ba.nbytes = len(head_ab), len(head_ba)  # count like protocol mode
        try:
            if head_ab:
                await loop.sock_sendall(sock_b, head_ab)
            if head_ba:
                await loop.sock_sendall(sock_a, head_ba)
        except OSError as exc:
            sp._fail(exc)
            return sp
        sp._start()
        return sp
    if mode != "protocol":
        raise ValueError(f"unknown splice mode {mode!r}")
    sp = ProtocolSplice(transform_ab=transform_ab, transform_ba=transform_ba,
                        high_water=high_water, on_close=on_close, linger=linger)
    end_a = _SockEnd(sp, sp.ab, sp.ba, "a")
    end_b = _SockEnd(sp, sp.ba, sp.ab, "b")
    try:
        ta, _proto_a = await loop.connect_accepted_socket(lambda: end_a, sock_a)
        sp._add(end_a)
        tb, _proto_b = await loop.connect_accepted_socket(lambda: end_b, sock_b)
        sp._add(end_b)
    except OSError as exc:
        for end in sp._ends:
            if end.transport is not None:
                end.transport.abort()
        sock_a.close()
        sock_b.close()
        sp.close(f"setup failed: {exc}")
        sp._finished()
        return sp
    sp.ab.src, sp.ab.dst = ta, tb
    sp.ba.src, sp.ba.dst = tb, ta
    sp._begin(head_ab, head_ba, False, False)
    return sp


def _pollable(fd: int) -> bool:
    """Whether epoll can watch ``fd``: pipes, sockets, ttys yes; regular files and
    ``/dev/null`` no (``EPERM``), and asyncio's pipe transports refuse those."""
    try:
        ep = select.epoll()
    except (AttributeError, OSError):  # not Linux: let asyncio decide
        return True
    try:
        ep.register(fd, select.EPOLLIN)
        return True
    except PermissionError:
        return False
    finally:
        ep.close()


def _via_thread_pipe(fd: int, direction: Literal["in", "out"],
                     drained: asyncio.Future[None] | None = None) -> int:
    """A pipe end standing in for ``fd``, which the loop cannot watch; a daemon thread copies.

    ``"in"``: the thread reads ``fd`` (which never blocks for long: a regular file or
    /dev/null) into a pipe and closes it at EOF; returns the read end. ``"out"``: the thread
    copies a pipe to ``fd``; returns the write end. ``drained`` is set when the thread is
    done, so the splice's ``wait_closed`` returns only once the last bytes reached ``fd``
    (a daemon: an interrupted run must not hang at exit on a pipe nobody closes).
    """
    loop = asyncio.get_running_loop()
    src = os.dup(fd)
    r, w = os.pipe()
    if direction == "in":
        copy_from, copy_to, keep = src, w, r
    else:
        copy_from, copy_to, keep = r, src, w

    def copy() -> None:
        try:
            while chunk := os.read(copy_from, 1 << 16):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(copy_to, view):]
        except OSError as exc:  # the splice closed its end early (EPIPE), or fd went away
            log.debug("stdio %s copy thread ends: %s", direction, exc)
        finally:
            os.close(copy_from)
            os.close(copy_to)
            if drained is not None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(
                        lambda: drained.done() or drained.set_result(None))

    threading.Thread(target=copy, name=f"stdio-{direction}", daemon=True).start()
    return keep


async def splice_stdio(sock: socket.socket, *, stdin_fd: int = 0, stdout_fd: int = 1,
                       transform_in: Transform | None = None,
                       transform_out: Transform | None = None, high_water: int = HIGH_WATER,
                       on_close: Callable[[Splice], None] | None = None,
                       linger: float = 10.0) -> ProtocolSplice:
    """Pump stdin -> ``sock`` and ``sock`` -> stdout (A = stdio, B = socket).

    ``transform_in`` applies to stdin->socket bytes, ``transform_out`` to socket->stdout.
    The fds are duplicated, so closing the splice does not close the process's 0/1.
    Pipes, sockets and ttys are watched by the loop directly; an end epoll cannot watch (a
    regular file, ``/dev/null``: ``sshnp --stdio < /dev/null``, ``> out.bin``) goes through
    a pipe fed by a thread (:func:`_via_thread_pipe`), so every stdin/stdout works.
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    sp = ProtocolSplice(transform_ab=transform_in, transform_ba=transform_out,
                        high_water=high_water, on_close=on_close, linger=linger)
    end_in = _PipeEnd(sp, sp.ab, None, "a")
    end_out = _PipeEnd(sp, None, sp.ba, "a")
    end_sock = _SockEnd(sp, sp.ba, sp.ab, "b")
    in_fd = os.dup(stdin_fd) if _pollable(stdin_fd) else _via_thread_pipe(stdin_fd, "in")
    if _pollable(stdout_fd):
        out_fd = os.dup(stdout_fd)
    else:
        drained: asyncio.Future[None] = loop.create_future()
        sp._drains.append(drained)
        out_fd = _via_thread_pipe(stdout_fd, "out", drained)
    rfile = open(in_fd, "rb", buffering=0)  # noqa: SIM115 - owned by transport
    wfile = open(out_fd, "wb", buffering=0)  # noqa: SIM115
    try:
        tin, _proto_in = await loop.connect_read_pipe(lambda: end_in, rfile)
        sp._add(end_in)
        tout, _proto_out = await loop.connect_write_pipe(lambda: end_out, wfile)
        sp._add(end_out)
        ts, _proto_sock = await loop.connect_accepted_socket(lambda: end_sock, sock)
        sp._add(end_sock)
    except (OSError, ValueError):
        for end in sp._ends:
            if end.transport is not None:
                end.transport.close()
        for f in (rfile, wfile):
            if not f.closed and not any(e.transport for e in sp._ends):
                f.close()
        raise
    sp.ab.src, sp.ab.dst = tin, ts
    sp.ba.src, sp.ba.dst = ts, tout
    sp._begin(b"", b"", False, False)
    return sp
