"""The data path of an established session: ``aes`` (stream cipher over the relay socket) or
``ssh`` (an outer SSH, paramiko, over the plaintext relay socket).

Both expose the same two ways out: ``serve_socket(sock)`` for a connection accepted on the
local port, ``serve_stdio()`` for ProxyCommand mode. paramiko is imported only in ssh mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .errors import SecurityError, TunnelError

if TYPE_CHECKING:
    from noports.npproto.streamcipher import SessionCipher

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
#: outer SSH flow control: a bigger window than paramiko's 2 MiB keeps a loopback pipe full
SSH_WINDOW = 16 * 1024 * 1024
SSH_MAX_PACKET = 32 * 1024


class Tunnel(Protocol):
    async def serve_socket(self, local: socket.socket) -> None: ...
    async def serve_stdio(self, stdin_fd: int = 0, stdout_fd: int = 1) -> None: ...
    def close(self) -> None: ...


# --- aes ---------------------------------------------------------------------------------------

def relay_lost(peer: str, exc: BaseException) -> TunnelError:
    """The relay side of a running tunnel ended badly: say which way, and what to check.

    Why both suspects for a truncated stream: srvd passes the device's half-close on, so a
    stopped srvd and a stopped sshnpd look the same from here (an EOF without the device's
    end-of-stream frame); a reset can only come from the relay's host.
    """
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionResetError):
        return TunnelError(f"relay connection lost: {peer} reset the connection ({text})",
                           hint="is srvd still running on the relay host?")
    if "truncated" in text:
        return TunnelError(f"relay connection lost: the stream from {peer} ended without the "
                           "device's end-of-stream frame",
                           hint="srvd or the device's sshnpd stopped mid-session; check both")
    if isinstance(exc, OSError):
        return TunnelError(f"relay connection lost: {peer}: {text}",
                           hint="is srvd still running, and the relay host reachable?")
    return TunnelError(f"the stream from {peer} failed its integrity check ({text})",
                       hint="someone may be tampering with the relay traffic")


class AesTunnel:
    """Relay socket + session cipher; bytes are pumped by :mod:`noports.relay.pump`.

    ``peer`` names the relay in errors (``relay @rv (host:port)``). A relay side that ends
    without the device's end-of-stream frame, or is reset, raises :class:`TunnelError` from
    ``serve_*`` (a clean end returns): the CLI prints it, the Ansible plugin shows it.
    """

    def __init__(self, relay_sock: socket.socket, cipher: SessionCipher,
                 peer: str = "the relay") -> None:
        self.relay_sock = relay_sock
        self.cipher = cipher
        self.peer = peer
        self.stats: Any = None
        self.closed = False
        #: called with the error line as the pump stops (stdio mode: before stdout closes,
        #: so the Ansible plugin finds the message when ssh reports the end)
        self.on_failure: Callable[[str], None] | None = None
        self._early: TunnelError | None = None

    def _stopping(self, sp: Any) -> None:
        if sp.failure is None or sp.failed_end not in ("b", None) or self.closed:
            return
        self._early = relay_lost(self.peer, sp.failure)
        if self.on_failure is not None:
            self.on_failure(str(self._early))
            self._early.reported = True

    def _check(self) -> None:
        if self._early is not None:
            raise self._early
        failure = getattr(self.stats, "relay_failure", None)
        if failure is not None and not self.closed:
            raise relay_lost(self.peer, failure)

    async def serve_socket(self, local: socket.socket) -> None:
        from noports.relay.pump import cipher_transforms, pump_socket
        local.setblocking(False)
        with contextlib.suppress(OSError):
            local.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        to_relay, from_relay = cipher_transforms(self.cipher)
        self.stats = await pump_socket(local, self.relay_sock, to_relay=to_relay,
                                       from_relay=from_relay, on_close=self._stopping)
        self._check()

    async def serve_stdio(self, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        from noports.relay.pump import cipher_transforms, pump_stdio
        to_relay, from_relay = cipher_transforms(self.cipher)
        self.stats = await pump_stdio(self.relay_sock, stdin_fd=stdin_fd, stdout_fd=stdout_fd,
                                      to_relay=to_relay, from_relay=from_relay,
                                      on_close=self._stopping)
        self._check()

    def close(self) -> None:
        from noports.relay.pump import abort_pump
        self.closed = True
        abort_pump(self.relay_sock)  # a running pump's transports must not outlive the socket
        with contextlib.suppress(OSError):
            self.relay_sock.close()


# --- ssh ---------------------------------------------------------------------------------------

_ALGOS_FOR_TYPE = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"),
}


def _load_pkey(text: str) -> Any:
    import paramiko
    errors = []
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError, TypeError) as exc:
            errors.append(f"{cls.__name__}: {exc}")
    raise SecurityError("cannot load the ephemeral private key from the device: "
                        + "; ".join(errors))


class SshTunnel:
    """An authenticated paramiko Transport to the device's sshd through the relay.

    The host key must be one of the keys the device listed in its *signed* response
    (``hostKeys``); anything else aborts before we authenticate. Each local connection gets
    its own ``direct-tcpip`` channel to ``localhost:<sshd port>`` (the daemon's permitopen).
    """

    def __init__(self, transport: Any, sshd_port: int, alias: str) -> None:
        self.transport = transport
        self.sshd_port = sshd_port
        self.alias = alias
        self.peer = "the relay"
        self.closed = False
        self.on_failure: Callable[[str], None] | None = None  # as AesTunnel's
        self._early: TunnelError | None = None

    def _lost(self) -> TunnelError | None:
        """The outer SSH died under a channel (relay or device gone): the error, else None."""
        if self.closed or self.transport.is_active():
            return None
        exc = self.transport.get_exception()
        why = f" ({str(exc) or type(exc).__name__})" if exc else ""
        return TunnelError(f"relay connection lost: the outer SSH through {self.peer} "
                           f"ended{why}", hint="srvd or the device's sshnpd stopped "
                           "mid-session; check both")

    def _report_lost(self) -> None:
        err = self._lost()
        if err is not None and self.on_failure is not None and self._early is None:
            self.on_failure(str(err))
            err.reported = True
            self._early = err

    def _check(self) -> None:
        err = self._early or self._lost()
        if err is not None:
            raise err

    @classmethod
    def connect(cls, sock: socket.socket, user: str, private_key: str, host_keys: list[str],
                sshd_port: int, timeout: float, alias: str) -> SshTunnel:
        """Blocking: handshake, pin check, public-key auth (run it in a thread)."""
        import paramiko
        sock.setblocking(True)
        sock.settimeout(None)
        pinned = {hk.split()[1] for hk in host_keys}
        types: list[str] = []
        for hk in host_keys:
            for algo in _ALGOS_FOR_TYPE.get(hk.split()[0], (hk.split()[0],)):
                if algo not in types:
                    types.append(algo)
        t = paramiko.Transport(sock, default_window_size=SSH_WINDOW,
                               default_max_packet_size=SSH_MAX_PACKET)
        t.banner_timeout = timeout
        t.handshake_timeout = timeout
        try:
            opts = t.get_security_options()
            supported = [a for a in types if a in opts.key_types]
            if supported:
                opts.key_types = supported
            try:
                t.start_client(timeout=timeout)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise TunnelError(f"outer SSH handshake with the device failed: {exc}",
                                  hint="is the device's sshd running on --remote-sshd-port?"
                                  ) from None
            key = t.get_remote_server_key()
            if key.get_base64() not in pinned:
                raise SecurityError(
                    f"host key mismatch: the device's sshd presented {key.get_name()} "
                    f"{key.get_fingerprint().hex()} which is not among the {len(pinned)} "
                    "key(s) in its signed response", step="host key",
                    hint="someone may be intercepting the relay; nothing was sent")
            pkey = _load_pkey(private_key)
            try:
                t.auth_publickey(user, pkey)
            except paramiko.AuthenticationException as exc:
                raise TunnelError(f"outer SSH: the device's sshd refused the ephemeral key "
                                  f"for user {user!r}: {exc}",
                                  hint="is -u/--remote-user the user sshnpd runs as?") from None
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise TunnelError(f"outer SSH authentication failed: {exc}") from None
        except BaseException:
            t.close()
            raise
        t.set_keepalive(30)
        return cls(t, sshd_port, alias)

    def open_channel(self) -> Any:
        import paramiko
        try:
            return self.transport.open_channel(
                "direct-tcpip", ("localhost", self.sshd_port), ("127.0.0.1", 0))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise TunnelError(f"outer SSH: cannot open a channel to localhost:{self.sshd_port} "
                              f"on the device: {exc}",
                              hint="does --remote-sshd-port match the daemon's "
                              "--local-sshd-port?") from None

    async def serve_socket(self, local: socket.socket) -> None:
        chan = await asyncio.to_thread(self.open_channel)
        local.setblocking(True)
        with contextlib.suppress(OSError):
            local.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def out(data: bytes) -> None:
            local.sendall(data)

        def out_eof() -> None:
            self._report_lost()  # before ssh sees the end (the agent's tunnels)
            with contextlib.suppress(OSError):
                local.shutdown(socket.SHUT_WR)

        try:
            await _pump_channel(chan, lambda: local.recv(CHUNK), out, out_eof)
        finally:
            with contextlib.suppress(OSError):
                local.close()
        self._check()

    async def serve_stdio(self, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
        chan = await asyncio.to_thread(self.open_channel)

        def out(data: bytes) -> None:
            view = memoryview(data)
            while view:
                n = os.write(stdout_fd, view)
                view = view[n:]

        def out_eof() -> None:
            # report before closing stdout: ssh (and the Ansible plugin) then finds the line
            self._report_lost()
            with contextlib.suppress(OSError):
                os.close(stdout_fd)

        await _pump_channel(chan, lambda: os.read(stdin_fd, CHUNK), out, out_eof)
        self._check()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.transport.close()


async def _pump_channel(chan: Any, read_local: Any, write_local: Any, local_eof: Any) -> None:
    """Copy local -> channel and channel -> local in two threads until the channel ends.

    Blocking threads are simplest with paramiko (its channels are thread-safe and have no
    asyncio interface). We return when the channel side is done; the local reader thread is
    a daemon and dies with the process if the local side never closes.
    """
    loop = asyncio.get_running_loop()
    done_in: asyncio.Future[None] = loop.create_future()

    def finish(fut: asyncio.Future[None]) -> None:
        if not fut.done():
            fut.set_result(None)

    def to_channel() -> None:
        try:
            while True:
                data = read_local()
                if not data:
                    break
                chan.sendall(data)
            chan.shutdown_write()
        except (OSError, EOFError, Exception) as exc:  # noqa: B014 - paramiko raises broadly
            log.debug("local -> channel ended: %s", exc)
            with contextlib.suppress(Exception):
                chan.close()

    def from_channel() -> None:
        try:
            while True:
                data = chan.recv(CHUNK)
                if not data:
                    break
                write_local(data)
        except (OSError, EOFError, Exception) as exc:  # noqa: B014
            log.debug("channel -> local ended: %s", exc)
        finally:
            local_eof()
            loop.call_soon_threadsafe(finish, done_in)

    threading.Thread(target=to_channel, name="sshnp-to-channel", daemon=True).start()
    threading.Thread(target=from_channel, name="sshnp-from-channel", daemon=True).start()
    await done_in
    with contextlib.suppress(Exception):
        chan.close()
