"""noports.netlimits: admission bookkeeping (pure) and the guarded TLS server on loopback."""

from __future__ import annotations

import asyncio
import socket
import ssl
from asyncio import sslproto
from pathlib import Path

import pytest

from noports.keys.ca import client_context, ensure_plane_tls, server_context
from noports.netlimits import (
    Admission,
    MemoryReleaser,
    RateLimitedLog,
    Verdict,
    make_idle_tls_cheap,
    release_memory,
    source_of,
    start_guarded_server,
)

# --------------------------------------------------------------------------- pure


def test_source_of_groups_ipv6_by_64_and_maps_ipv4() -> None:
    assert source_of(("10.1.2.3", 5000)) == "10.1.2.3"
    assert source_of(("::ffff:10.1.2.3", 5000, 0, 0)) == "10.1.2.3"
    assert source_of(("2001:db8:1:2:aaaa::1", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert source_of(("2001:db8:1:2:bbbb::9", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert source_of(("::1", 1, 0, 0)) == "::1"
    assert source_of(("fe80::1%eth0", 1, 0, 2)) == "fe80::/64"
    assert source_of("/run/sock") is None
    assert source_of(None) is None
    assert source_of(("not-an-ip", 1)) is None


def test_admission_per_source_limit_names_flag_and_value() -> None:
    adm = Admission(10, 2)
    assert adm.admit("1.1.1.1") is None
    assert adm.admit("1.1.1.1") is None
    reason = adm.admit("1.1.1.1")
    assert reason == "too many connections from 1.1.1.1: limit --max-connections-per-ip 2"
    assert adm.open_from("1.1.1.1") == 2 and adm.open_total == 2
    assert adm.admit("2.2.2.2") is None  # others are not affected
    adm.release("1.1.1.1")
    assert adm.admit("1.1.1.1") is None


def test_admission_total_limit_and_custom_names() -> None:
    adm = Admission(3, 3, total_name="--max-clients", per_source_name="--per-ip")
    for i in range(3):
        assert adm.admit(f"10.0.0.{i}") is None
    assert adm.admit("10.0.0.9") == "server busy: 3 connections open, limit --max-clients 3"
    assert adm.admit(None) is not None
    adm.release("10.0.0.0")
    assert adm.admit(None) is None  # unknown source: counted in the total only
    assert adm.open_total == 3


def test_admission_release_forgets_sources_and_never_goes_negative() -> None:
    adm = Admission(5, 5)
    adm.admit("a")
    adm.release("a")
    adm.release("a")
    adm.release(None)
    assert adm.sources() == 0 and adm.open_total == 0
    with pytest.raises(ValueError):
        Admission(0, 1)


def test_full_total_evicts_the_oldest_unproven_connection() -> None:
    adm = Admission(3, 3)
    assert adm.open("a1", "10.0.0.1") == Verdict()
    assert adm.open("a2", "10.0.0.1") == Verdict()
    assert adm.open("legit", "10.0.0.2") == Verdict()
    adm.proven("legit")  # authenticated: never a candidate
    v = adm.open("a3", "10.0.0.3")
    assert v.refusal is None and v.evict == "a1"
    assert v.eviction == ("server busy: 3 connections open, limit --max-connections 3; the "
                          "oldest connection not yet authenticated is closed to make room")
    assert adm.open_total == 3 and not adm.is_open("a1") and adm.evictions == 1
    assert adm.open_from("10.0.0.1") == 1
    assert adm.open("a4", None).evict == "a2"  # oldest first
    assert adm.open("a5", None).evict == "a3"
    adm.close("a1")  # the evicted socket's own close later: already forgotten, no double count
    assert adm.open_total == 3 and adm.is_open("legit")
    adm.proven("a4")
    adm.proven("a5")
    v = adm.open("a6", "10.0.0.9")  # only proven connections left: refused, nothing counted
    assert v.refusal == "server busy: 3 connections open, limit --max-connections 3"
    assert v.evict is None and not adm.is_open("a6") and adm.open_total == 3
    for key in ("legit", "a4", "a5"):
        adm.close(key)
    assert adm.open_total == 0 and adm.sources() == 0 and adm.open_unproven == 0


def test_per_source_limit_applies_before_eviction_and_never_evicts() -> None:
    adm = Admission(2, 1, unproven="not yet answered")
    assert adm.open("x", "1.1.1.1").evict is None
    assert adm.open("y", "2.2.2.2").evict is None
    v = adm.open("z", "1.1.1.1")  # full, but the source is at its own limit: refused
    assert v == Verdict(refusal="too many connections from 1.1.1.1: "
                                "limit --max-connections-per-ip 1")
    v = adm.open("w", "3.3.3.3")
    assert v.evict == "x" and "oldest connection not yet answered" in (v.eviction or "")
    with pytest.raises(ValueError):
        adm.open("w", "3.3.3.3")  # one key, one slot


def test_eviction_can_be_turned_off() -> None:
    adm = Admission(1, 1, evict=False)
    assert adm.open("a", "1.1.1.1").refusal is None
    assert adm.open("b", "2.2.2.2").refusal == ("server busy: 1 connections open, "
                                                "limit --max-connections 1")


def test_rate_limited_log_counts_what_it_leaves_out(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    limited = RateLimitedLog(logging.getLogger("t.flood"), interval=3600)
    with caplog.at_level(logging.INFO, logger="t.flood"):
        for i in range(5):
            limited.log(logging.INFO, "closing connection from %s", i)
        limited.interval = 0
        limited.log(logging.INFO, "closing connection from %s", 9)
    assert [r.getMessage() for r in caplog.records] == [
        "closing connection from 0",
        "closing connection from 9 (and 4 more such lines left out)"]


def test_memory_releaser_trims_once_after_a_burst_has_paused() -> None:
    calls: list[int] = []
    rel = MemoryReleaser(every=3, quiet=0.5, max_wait=5.0, trim=lambda: calls.append(1) or True)
    rel.closed(9.9)
    rel.closed(9.95)
    assert not rel.due(10.0) and not rel.run(10.0)  # too few closes to be worth a trim
    rel.closed(10.0)
    assert not rel.run(10.2)  # the burst may go on
    assert rel.next_check(10.2) == pytest.approx(0.3)
    assert rel.run(10.5) and calls == [1] and rel.pending == 0
    # closes that never pause: trimmed max_wait after the first pending one
    for i in range(100):
        rel.closed(20.0 + i * 0.1)
    assert rel.due(25.0) and rel.run(25.0) and len(calls) == 2


def test_release_memory_returns_a_bool() -> None:
    assert release_memory() in (True, False)


def test_make_idle_tls_cheap_sets_and_restores() -> None:
    before = sslproto.SSLProtocol.max_size
    try:
        previous = make_idle_tls_cheap(40 * 1024)
        assert previous == before
        assert sslproto.SSLProtocol.max_size == 40 * 1024
        with pytest.raises(ValueError):
            make_idle_tls_cheap(4096)
    finally:
        sslproto.SSLProtocol.max_size = before


# --------------------------------------------------------------------------- real TLS on loopback


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    files = ensure_plane_tls(Path(tmp_path_factory.mktemp("tls")), ["127.0.0.1", "localhost"])
    return server_context(files, request_client_cert=False), client_context(files.ca_cert)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"@")
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.close()


def test_guarded_server_counts_raw_tcp_and_tells_refused_peer(
        tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    srv_ctx, cli_ctx = tls

    async def main() -> None:
        adm = Admission(100, 3)
        server = await start_guarded_server(
            _echo, "127.0.0.1", 0, ssl=srv_ctx, admission=adm, handshake_timeout=0.5,
            refusal=lambda reason: f"error:{reason}\n".encode())
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        # Three raw TCP sockets that never start TLS take the three slots of 127.0.0.1.
        raws = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", port))
            raws.append(s)
        for _ in range(50):
            if adm.open_from("127.0.0.1") == 3:
                break
            await asyncio.sleep(0.01)
        assert adm.open_from("127.0.0.1") == 3
        # A TLS client now is refused, and told which limit.
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=cli_ctx,
                                             server_hostname="127.0.0.1")
        text = await asyncio.wait_for(r.read(), 5)
        assert text == b"error:too many connections from 127.0.0.1: " \
                       b"limit --max-connections-per-ip 3\n"
        w.close()
        # The handshake deadline (0.5 s) frees the slots of the silent sockets.
        for _ in range(100):
            if adm.open_total == 0:
                break
            await asyncio.sleep(0.05)
        assert adm.open_total == 0
        for s in raws:
            s.close()
        # A legitimate client is served normally afterwards, pipelined bytes included.
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=cli_ctx,
                                             server_hostname="127.0.0.1")
        assert await asyncio.wait_for(r.readexactly(1), 5) == b"@"
        w.write(b"hello\nworld\n")
        assert await asyncio.wait_for(r.readline(), 5) == b"HELLO\n"
        assert await asyncio.wait_for(r.readline(), 5) == b"WORLD\n"
        assert adm.open_total == 1
        w.close()
        await w.wait_closed()
        for _ in range(100):
            if adm.open_total == 0:
                break
            await asyncio.sleep(0.01)
        assert adm.open_total == 0
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_guarded_server_bad_handshake_releases_slot(
        tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    srv_ctx, cli_ctx = tls

    async def main() -> None:
        adm = Admission(100, 1)
        server = await start_guarded_server(_echo, "127.0.0.1", 0, ssl=srv_ctx, admission=adm,
                                            handshake_timeout=5)
        port = server.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)) * 4)
        await w.drain()
        assert await asyncio.wait_for(r.read(), 5) is not None  # server closes
        w.close()
        for _ in range(100):
            if adm.open_total == 0:
                break
            await asyncio.sleep(0.01)
        assert adm.open_total == 0
        # The one slot of 127.0.0.1 is free again: a TLS client is served.
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=cli_ctx,
                                             server_hostname="127.0.0.1")
        assert await asyncio.wait_for(r.readexactly(1), 5) == b"@"
        w.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
