"""The splice's end-of-stream hook: AEAD end frames are sent, and truncation is not a clean EOF."""

from __future__ import annotations

import asyncio
import os
import socket

from noports.npproto.streamcipher import AeadStream, CtrDuplex
from noports.relay.pump import cipher_transforms
from noports.relay.splice import splice_sockets

KEY, IV = os.urandom(32), os.urandom(16)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (a reset only exists for TCP)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


async def _recv_all(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, str]:
    """Read until EOF; report whether the end was clean ('eof') or a reset ('reset')."""
    loop = asyncio.get_running_loop()
    out = bytearray()
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
        except ConnectionResetError:
            return bytes(out), "reset"
        if not chunk:
            return bytes(out), "eof"
        out += chunk


async def _session(peer_frames: bytes, send_end: bool, cipher_cls=AeadStream):
    """app <-> [splice with the daemon's cipher] <-> peer (the client side, raw frames)."""
    app, app_side = tcp_pair()
    peer_side, peer = tcp_pair()
    for s in (app, peer):
        s.setblocking(False)
    daemon = (cipher_cls(KEY, IV, is_client=False) if cipher_cls is AeadStream
              else cipher_cls(KEY, IV))
    to_peer, from_peer = cipher_transforms(daemon)
    sp = await splice_sockets(app_side, peer_side, transform_ab=to_peer, transform_ba=from_peer)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(peer, peer_frames)
    peer.shutdown(socket.SHUT_WR)
    got, how = await _recv_all(app)
    app.close()
    peer.close()
    sp.close("test over")
    return got, how


def _client_frames(text: bytes, send_end: bool) -> bytes:
    client = AeadStream(KEY, IV, is_client=True)
    return client.encrypt(text) + (client.close() if send_end else b"")


def test_aead_clean_end_reaches_the_app_as_eof():
    got, how = asyncio.run(_session(_client_frames(b"hello device", True), True))
    assert (got, how) == (b"hello device", "eof")


def test_aead_truncated_stream_is_a_reset_not_an_eof():
    got, how = asyncio.run(_session(_client_frames(b"hello device", False), False))
    assert got == b"hello device"
    assert how == "reset"


def test_ctr_has_no_end_frame_and_ends_cleanly():
    ctr = CtrDuplex(KEY, IV)
    got, how = asyncio.run(_session(ctr.encrypt(b"legacy"), False, CtrDuplex))
    assert (got, how) == (b"legacy", "eof")


def test_aead_sender_writes_end_frame_before_half_close():
    async def run() -> None:
        app, app_side = tcp_pair()
        peer_side, peer = tcp_pair()
        for s in (app, peer):
            s.setblocking(False)
        to_peer, from_peer = cipher_transforms(AeadStream(KEY, IV, is_client=False))
        sp = await splice_sockets(app_side, peer_side, transform_ab=to_peer,
                                  transform_ba=from_peer)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(app, b"from the device")
        app.shutdown(socket.SHUT_WR)
        raw, how = await _recv_all(peer)
        assert how == "eof"
        client = AeadStream(KEY, IV, is_client=True)
        assert client.decrypt(raw) == b"from the device"
        client.finish()  # raises if the end frame were missing
        assert client.ended
        app.close()
        peer.close()
        sp.close("test over")

    asyncio.run(run())
