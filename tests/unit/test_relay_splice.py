"""Splice/pump building blocks on socketpairs (no relay): half-close, transforms, auth line."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from noports.relay import splice as splice_mod
from noports.relay.pump import _auth_bytes
from noports.relay.splice import HAS_OS_SPLICE, splice_sockets

MODES = ["protocol"] + (["os_splice"] if HAS_OS_SPLICE else [])


def test_auth_line_normalised() -> None:
    assert _auth_bytes('{"payload":{}}') == b'{"payload":{}}\n'
    assert _auth_bytes(b"x\n") == b"x\n"
    assert _auth_bytes(None) == b""
    with pytest.raises(ValueError):
        _auth_bytes(b"a\nb")


@pytest.mark.parametrize("mode", MODES)
def test_splice_heads_half_close_and_counts(mode: str) -> None:
    async def main() -> None:
        a_app, a_relay = socket.socketpair()
        b_app, b_relay = socket.socketpair()
        closed = []
        sp = await splice_sockets(a_relay, b_relay, mode=mode, head_ab=b"early-",
                                  on_close=closed.append)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        for s in (a_app, b_app):
            s.setblocking(False)
        await loop.sock_sendall(a_app, b"data")
        a_app.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := await loop.sock_recv(b_app, 100):
            buf += chunk
        assert buf == b"early-data"
        await loop.sock_sendall(b_app, b"back")
        b_app.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(a_app, 100) == b"back"
        await asyncio.wait_for(sp.wait_closed(), 5)
        assert closed == [sp] and (sp.bytes_ab, sp.bytes_ba) == (10, 4)
        a_app.close()
        b_app.close()

    asyncio.run(main())


def test_transform_applies_per_direction() -> None:
    async def main() -> None:
        a_app, a_relay = socket.socketpair()
        b_app, b_relay = socket.socketpair()
        sp = await splice_sockets(a_relay, b_relay, transform_ab=bytes.upper,
                                  transform_ba=bytes.lower)
        loop = asyncio.get_running_loop()
        for s in (a_app, b_app):
            s.setblocking(False)
        await loop.sock_sendall(a_app, b"hello")
        assert await loop.sock_recv(b_app, 100) == b"HELLO"
        await loop.sock_sendall(b_app, b"WORLD")
        assert await loop.sock_recv(a_app, 100) == b"world"
        sp.close("done")
        await asyncio.wait_for(sp.wait_closed(), 5)
        a_app.close()
        b_app.close()

    with pytest.raises(ValueError):
        asyncio.run(_os_splice_with_transform())
    asyncio.run(main())


async def _os_splice_with_transform() -> None:
    a, b = socket.socketpair()
    try:
        await splice_sockets(a, b, mode="os_splice", transform_ab=bytes.upper)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("honour_pause", [True, False])
def test_bytes_and_eof_waiting_before_wiring_are_kept(monkeypatch, honour_pause: bool) -> None:
    """Python <= 3.11.2 ignores pause_reading() from connection_made (Debian 12's python3).

    ``honour_pause=False`` reproduces that on any version: the transport starts reading
    before the splice has both ends, and those bytes (and the EOF) must still arrive.
    """
    if not honour_pause:
        def eager(self, transport):  # connection_made without the pause
            self.transport = transport
        monkeypatch.setattr(splice_mod._SockEnd, "connection_made", eager)

    async def main() -> None:
        a_app, a_relay = socket.socketpair()
        b_app, b_relay = socket.socketpair()
        payload = bytes(range(256)) * 4096  # 1 MiB: more than one read
        a_app.sendall(b"x")  # kernel buffers are small; the rest is sent once spliced
        b_app.sendall(b"BACK")  # ... and B's whole stream, EOF included, is already there
        b_app.shutdown(socket.SHUT_WR)
        loop = asyncio.get_running_loop()
        for s in (a_app, b_app):
            s.setblocking(False)
        sp = await splice_sockets(a_relay, b_relay, mode="protocol",
                                  transform_ab=bytes.upper, transform_ba=bytes.lower)

        async def send_a() -> None:
            await loop.sock_sendall(a_app, payload)
            a_app.shutdown(socket.SHUT_WR)

        async def recv_b() -> bytes:
            got = bytearray()
            while chunk := await loop.sock_recv(b_app, 1 << 20):
                got += chunk
            return bytes(got)

        _, got_b = await asyncio.wait_for(asyncio.gather(send_a(), recv_b()), 20)
        assert got_b == b"X" + payload.upper()
        assert await loop.sock_recv(a_app, 100) == b"back"
        await asyncio.wait_for(sp.wait_closed(), 5)
        a_app.close()
        b_app.close()

    asyncio.run(main())


@pytest.mark.parametrize("stdin_kind", ["devnull", "file"])
def test_stdio_splice_on_ends_epoll_cannot_watch(tmp_path, stdin_kind: str) -> None:
    """``sshnp --stdio < /dev/null > out.bin``: asyncio refuses such fds; they still work.

    Before: ``PermissionError: [Errno 1] Operation not permitted`` from connect_read_pipe,
    reported as an unexpected error.
    """
    payload = b"" if stdin_kind == "devnull" else bytes(range(256)) * 4096  # 1 MiB
    src = tmp_path / "in.bin"
    src.write_bytes(payload)
    out = tmp_path / "out.bin"

    async def main() -> None:
        app, relay = socket.socketpair()
        app.setblocking(False)
        in_path = "/dev/null" if stdin_kind == "devnull" else str(src)
        in_fd = os.open(in_path, os.O_RDONLY)
        out_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        assert not splice_mod._pollable(in_fd) and not splice_mod._pollable(out_fd)
        try:
            sp = await splice_mod.splice_stdio(relay, stdin_fd=in_fd, stdout_fd=out_fd)
        finally:
            os.close(in_fd)  # the splice holds its own copies
            os.close(out_fd)
        loop = asyncio.get_running_loop()
        got = bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(app, 1 << 16), 5):
            got += chunk
        assert bytes(got) == payload  # stdin's EOF arrives as EOF
        await loop.sock_sendall(app, b"from the device")
        app.close()
        await asyncio.wait_for(sp.wait_closed(), 5)
        assert (sp.bytes_ab, sp.bytes_ba) == (len(payload), 15)
        # wait_closed returns once the copy thread wrote the last bytes to the file
        assert out.read_bytes() == b"from the device"

    asyncio.run(main())
    for t in threading.enumerate():  # the copy threads end with the splice
        if t.name.startswith("stdio-"):
            t.join(5)
            assert not t.is_alive()
    assert out.read_bytes() == b"from the device"


def test_pollable_tells_pipes_from_files(tmp_path) -> None:
    r, w = os.pipe()
    f = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert splice_mod._pollable(r) and splice_mod._pollable(w)
        assert not splice_mod._pollable(f)
    finally:
        for fd in (r, w, f):
            os.close(fd)


# --- ends of a ProxyCommand tunnel (issue 15): clean ends stay clean, cuts are named ----------

def _aead_pair():  # noqa: ANN202 - (client cipher, device cipher)
    from noports.npproto.streamcipher import AeadStream
    key, iv = bytes(range(32)), bytes(range(16))
    return AeadStream(key, iv, is_client=True), AeadStream(key, iv, is_client=False)


async def _stdio_with_cipher(errors: list):  # noqa: ANN202
    """splice_stdio on two pipes and a socketpair, with the client's AEAD transforms;
    returns (splice, stdin write end, stdout read end, device socket, device cipher)."""
    from noports.relay.pump import cipher_transforms
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    client, device = _aead_pair()
    to_relay, from_relay = cipher_transforms(client)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    app, relay = socket.socketpair()
    app.setblocking(False)
    try:
        sp = await splice_mod.splice_stdio(relay, stdin_fd=in_r, stdout_fd=out_w,
                                           transform_in=to_relay, transform_out=from_relay,
                                           linger=5)
    finally:
        os.close(in_r)  # the splice holds its own copies
        os.close(out_w)
    return sp, in_w, out_r, app, device


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 5):
        got += chunk
    return bytes(got)


def test_stdio_end_is_clean_when_ssh_closes_stdout_first() -> None:
    """What OpenSSH does as it exits: it closes our stdout (and stdin), then sends SIGHUP.
    Before: stdout's close closed the whole splice, so the end-of-stream frame never went
    out and the daemon logged "end of stream rejected ... aborting" for every normal end."""
    errors: list = []

    async def main() -> None:
        sp, in_w, out_r, app, device = await _stdio_with_cipher(errors)
        loop = asyncio.get_running_loop()
        os.write(in_w, b"ssh bytes")
        await asyncio.sleep(0.05)
        os.close(out_r)  # ssh's reader is gone first ...
        await loop.sock_sendall(app, device.encrypt(b"late sshd bytes"))  # ... dropped
        await asyncio.sleep(0.05)
        os.close(in_w)  # ... then its writer: our end-of-stream frame must still go out
        got = await _read_all(app)
        assert device.decrypt(got) == b"ssh bytes"
        device.finish()  # raises if the client's end frame is missing
        await loop.sock_sendall(app, device.close())  # the device ends properly too
        app.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(sp.wait_closed(), 5)
        assert (sp.close_reason, sp.failure) == ("clean", None)
        app.close()

    asyncio.run(main())
    assert errors == []


def test_truncated_relay_stream_is_named_not_raised() -> None:
    """The relay dies mid-session: an EOF without the device's end frame. Before: the abort
    called ``abort()`` on the stdin pipe transport, which has none (AttributeError)."""
    errors: list = []

    async def main() -> None:
        sp, in_w, out_r, app, device = await _stdio_with_cipher(errors)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(app, device.encrypt(b"partial"))
        app.close()  # no end frame
        await asyncio.wait_for(sp.wait_closed(), 5)
        assert sp.close_reason.startswith("aborted: end of stream rejected (stream truncated")
        assert sp.failed_end == "b" and "truncated" in str(sp.failure)
        assert os.read(out_r, 100) == b"partial"
        os.close(in_w)
        os.close(out_r)

    asyncio.run(main())
    assert errors == []


def test_relay_address_is_parsed_in_place_and_names_still_resolve(monkeypatch) -> None:
    """connect_relay's lookup: an IP address (what relays answer) needs no executor hop
    (a wait on a busy machine); a host name still goes to the loop's getaddrinfo."""
    from noports.relay import pump

    async def main() -> None:
        loop = asyncio.get_running_loop()
        asked: list[str] = []
        real = loop.getaddrinfo

        async def spy(host, port, **kw):
            asked.append(host)
            return await real(host, port, **kw)

        monkeypatch.setattr(loop, "getaddrinfo", spy)
        v4 = await pump._resolve("127.0.0.1", 4000)
        v6 = await pump._resolve("::1", 4000)
        assert v4[0][4] == ("127.0.0.1", 4000) and v6[0][4][:2] == ("::1", 4000)
        assert asked == []
        named = await pump._resolve("localhost", 4000)
        assert asked == ["localhost"] and named

    asyncio.run(main())
