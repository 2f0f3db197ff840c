"""Connection limits of a real `atserver` process over real TLS (docs/atserver.md, Limits).

Counted from TCP accept, before TLS: connections in total and per source address; the TLS
handshake and the time to authenticate have deadlines. Each refusal is named in the line the
peer reads and in the server log, and a legitimate client from another address keeps being
served. Loopback only: 127.0.0.2-127.0.0.5 are other source addresses on the same machine.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

import pytest
from test_atserver_s2s import Client, Plane, _wait_line

from noports import crypto, netlimits

pytestmark = pytest.mark.integration

LIMITS = ["--max-connections", "8", "--max-connections-per-ip", "4",
          "--tls-handshake-timeout", "1", "--auth-timeout", "2"]


class SourceClient(Client):
    """The test client, connecting from a chosen loopback source address."""

    def __init__(self, port: int, cafile, source: str = "127.0.0.1") -> None:
        ctx = ssl.create_default_context(cafile=str(cafile))
        raw = socket.create_connection(("127.0.0.1", port), timeout=15,
                                       source_address=(source, 0))
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buf = b""
        first = self._read_until(lambda b: b.endswith(b"@") or b.endswith(b"\n"))
        if first != "@":
            raise Refused(first)


class Refused(Exception):
    pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    plane = Plane(tmp_path_factory.mktemp("limits"))
    plane.add("p1", "@ann")
    s = plane.start("p1", ["@ann"], LIMITS)
    yield plane, s["ports"]["@ann"]
    plane.stop_all()


def login(plane: Plane, port: int, source: str) -> SourceClient:
    c = SourceClient(port, plane.cafile, source)
    ch = c.data("from:@ann")
    assert c.data("cram:" + crypto.cram_digest(plane.secrets["@ann"], ch)) == "success"
    return c


def refusal(plane: Plane, port: int, source: str) -> str:
    with pytest.raises(Refused) as exc:
        SourceClient(port, plane.cafile, source)
    return str(exc.value)


def test_per_source_and_total_limits_name_the_flag(server):
    plane, port = server
    log = plane.root / "p1.log"
    held = [login(plane, port, "127.0.0.1") for _ in range(4)]
    try:
        line = refusal(plane, port, "127.0.0.1")
        assert line.startswith("error:AT0012-Inbound connection limit exceeded: too many "
                               "connections from 127.0.0.1: limit --max-connections-per-ip 4")
        other = login(plane, port, "127.0.0.2")  # another address is still served
        assert other.data("noop:0") == "ok"
        held.append(other)
        held += [login(plane, port, "127.0.0.3") for _ in range(3)]  # 8 open in total
        time.sleep(netlimits.REFUSAL_LOG_INTERVAL + 0.2)  # refusals are logged once a second
        line = refusal(plane, port, "127.0.0.4")
        assert "server busy: 8 connections open, limit --max-connections 8" in line
        assert all(c.data("noop:0") == "ok" for c in held)  # the admitted ones are served
        _wait_line(log, r"refusing connection from 127\.0\.0\.4: server busy")
    finally:
        for c in held:
            c.close()
    deadline = time.monotonic() + 15  # slots come back when the sockets close
    while True:
        try:
            c = login(plane, port, "127.0.0.1")
            break
        except Refused:
            assert time.monotonic() < deadline, "slots not released after close"
            time.sleep(0.1)
    assert c.data("noop:0") == "ok"
    c.close()


def test_tls_handshake_deadline_closes_silent_sockets(server):
    plane, port = server
    silent = [socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.5", 0))
              for _ in range(4)]
    try:
        c = login(plane, port, "127.0.0.2")
        for s in silent:  # closed by the server after --tls-handshake-timeout 1
            s.settimeout(20)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""
        assert c.data("noop:0") == "ok"
        assert login(plane, port, "127.0.0.5").data("noop:0") == "ok"  # its slots are free
        c.close()
    finally:
        for s in silent:
            s.close()


def test_unauthenticated_connection_closed_after_auth_timeout(server):
    plane, port = server
    idle = SourceClient(port, plane.cafile, "127.0.0.3")
    legit = login(plane, port, "127.0.0.2")
    line = idle.readline(timeout=20).split("\n")[0]
    assert line == ("error:AT0401-Exception: not authenticated within 2 s (--auth-timeout); "
                    "closing")
    with pytest.raises((ConnectionError, OSError)):
        for _ in range(3):
            idle.cmd("noop:0")
    time.sleep(2.5)
    assert legit.data("noop:0") == "ok"  # authenticated: no deadline
    _wait_line(plane.root / "p1.log", r"not authenticated within 2 s \(--auth-timeout\)")
    legit.close()


def test_hostile_unauthenticated_lines_do_not_stall_others(server):
    plane, port = server
    legit = login(plane, port, "127.0.0.2")
    anon = SourceClient(port, plane.cafile, "127.0.0.3")
    assert anon.cmd("scan (.+)+(.+)+X").startswith("data:[")
    assert anon.cmd("scan (a)\\1").startswith("error:AT0022")
    assert anon.cmd("stats:1").startswith("error:AT0401")
    big = SourceClient(port, plane.cafile, "127.0.0.4")
    with contextlib.suppress(OSError):  # refused after 8 KiB: the rest may meet a reset
        big.sock.sendall(b"stats:" + b"1," * 100_000 + b"\n")
    with contextlib.suppress(OSError):
        r = big._read_until(lambda b: b"\n" in b)
        assert r.startswith("error:AT0005") and "--max-unauth-line" in r, r
    assert legit.data("noop:0") == "ok"
    assert anon.cmd("info").startswith("data:{")
    for c in (legit, anon, big):
        c.close()


def test_auth_timeout_closes_a_used_public_connection_without_a_stray_line(server):
    """A pooled public-lookup connection between requests: closed, no unsolicited reply."""
    plane, port = server
    pooled = SourceClient(port, plane.cafile, "127.0.0.3")
    assert pooled.cmd("lookup:signing_publickey@ann").startswith("data:")
    pooled.sock.settimeout(20)
    with contextlib.suppress(ConnectionResetError):
        assert pooled.sock.recv(100) == b""  # EOF, nothing written first
    fresh = SourceClient(port, plane.cafile, "127.0.0.3")  # the client reconnects and is served
    assert fresh.cmd("lookup:signing_publickey@ann").startswith("data:")
    fresh.close()


@pytest.fixture(scope="module")
def roomy(tmp_path_factory):
    """A second server whose deadlines are long: connections leave only when evicted."""
    plane = Plane(tmp_path_factory.mktemp("evict"))
    plane.add("p2", "@bea")
    s = plane.start("p2", ["@bea"], ["--max-connections", "8", "--max-connections-per-ip",
                                     "4", "--tls-handshake-timeout", "60",
                                     "--auth-timeout", "60"])
    yield plane, s["ports"]["@bea"]
    plane.stop_all()


def login_bea(plane: Plane, port: int, source: str) -> SourceClient:
    c = SourceClient(port, plane.cafile, source)
    ch = c.data("from:@bea")
    assert c.data("cram:" + crypto.cram_digest(plane.secrets["@bea"], ch)) == "success"
    return c


def test_full_server_evicts_oldest_unauthenticated_never_authenticated(roomy):
    """OpenSSH MaxStartups style: at --max-connections a new connection takes the slot of
    the oldest one that has not authenticated; authenticated ones are never closed."""
    plane, port = roomy
    busy = ("server busy: 8 connections open, limit --max-connections 8")
    evicted_line = (f"error:AT0012-Inbound connection limit exceeded: {busy}; the oldest "
                    "connection not yet authenticated is closed to make room")
    ann = login_bea(plane, port, "127.0.0.2")  # authenticated first: the oldest of all
    raw = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.3", 0))
    time.sleep(0.2)  # accepted before the TLS idlers, so it is the oldest unauthenticated
    idle = [SourceClient(port, plane.cafile, src)
            for src in ["127.0.0.3"] * 3 + ["127.0.0.4"] * 3]  # 8 open in total
    held = [ann]
    try:
        # the attacker's own per-source limit still comes first (no eviction for it)
        assert refusal(plane, port, "127.0.0.3").startswith(
            "error:AT0012-Inbound connection limit exceeded: too many connections from "
            "127.0.0.3: limit --max-connections-per-ip 4")
        time.sleep(netlimits.REFUSAL_LOG_INTERVAL + 0.2)  # so the eviction is logged too
        # a legitimate client connects, authenticates and is served: the raw socket made room
        first = login_bea(plane, port, "127.0.0.5")
        held.append(first)
        assert first.data("noop:0") == "ok"
        raw.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(100) == b""  # no TLS yet: closed without a word
        # the next one evicts the oldest idle TLS connection, which is told why
        second = login_bea(plane, port, "127.0.0.5")
        held.append(second)
        assert idle[0].readline(timeout=10) == evicted_line
        assert ann.data("noop:0") == "ok" and second.data("noop:0") == "ok"
        # fill every slot with authenticated connections: the idle ones go, oldest first
        for src in ["127.0.0.2"] * 3 + ["127.0.0.5"] * 2:
            held.append(login_bea(plane, port, src))
        for c in idle[1:]:
            assert c.readline(timeout=10) == evicted_line
        # now nothing is evictable: a new connection is refused, naming the limit
        time.sleep(netlimits.REFUSAL_LOG_INTERVAL + 0.2)
        assert refusal(plane, port, "127.0.0.6") == (
            f"error:AT0012-Inbound connection limit exceeded: {busy}\n")
        assert len(held) == 8 and all(c.data("noop:0") == "ok" for c in held)
        log = plane.root / "p2.log"
        _wait_line(log, r"refusing connection from 127\.0\.0\.6: server busy")
        _wait_line(log, r"evicting connection from 127\.0\.0\.3: server busy")
    finally:
        raw.close()
        for c in held + idle:
            c.close()
