"""The real `atdirectory` CLI as a subprocess over real TLS (SQLite, Redis, Python SDK)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from noports.keys.ca import client_context
from tests.harness.plane import free_port

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
ATDIRECTORY = [sys.executable, "-m", "noports.directory.cli"]
if (VENV_BIN / "atdirectory").exists():
    ATDIRECTORY = [str(VENV_BIN / "atdirectory")]
REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
# Fast policy for tests: 2 free misses per connection, then 0.05 s, 0.1 s, 0.2 s, 0.2 s, ...
FAST_POLICY = ["--miss-burst", "2", "--miss-refill", "0", "--ip-miss-burst", "1000",
               "--miss-base-delay", "0.05", "--miss-max-delay", "0.2"]


@dataclass
class Directory:
    proc: subprocess.Popen[bytes]
    port: int
    tls_dir: Path
    state_dir: Path
    log: Path

    @property
    def ca(self) -> Path:
        return self.tls_dir / "ca.pem"

    def cli(self, *argv: str, store: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = ["--store", store] if store else ["--state-dir", str(self.state_dir)]
        return run_cli(*argv, *extra)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ATDIRECTORY, *argv], capture_output=True, text=True, timeout=30)


def start_directory(state_dir: Path, *extra: str) -> Directory:
    """Start `atdirectory serve --port 0` and read the chosen port from its stderr."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log = state_dir / f"atdirectory-{time.monotonic_ns()}.log"
    tls_dir = state_dir / "tls"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [*ATDIRECTORY, "serve", "--host", "127.0.0.1", "--port", "0", "--state-dir",
             str(state_dir), "--tls-dir", str(tls_dir), "--log-level", "DEBUG", *extra],
            stdout=subprocess.DEVNULL, stderr=fh)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("atdirectory listening on "):
                port = int(line.rsplit(":", 1)[1])
                return Directory(proc, port, tls_dir, state_dir, log)
        if proc.poll() is not None:
            raise AssertionError(f"atdirectory exited {proc.returncode}: {log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"atdirectory did not report its port: {log.read_text()}")


class RootClient:
    """Minimal blocking root client that checks the exact reply framing."""

    def __init__(self, port: int, ca: Path, host: str = "127.0.0.1",
                 source: str | None = None) -> None:
        raw = socket.create_connection((host, port), timeout=10,
                                       source_address=(source, 0) if source else None)
        self.sock = client_context(ca).wrap_socket(raw, server_hostname=host)
        assert self.recv_reply() == b"@"

    def recv_reply(self) -> bytes:
        data = b""
        while not (data == b"@" or data.endswith(b"\r\n@")):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
        return data

    def ask(self, line: bytes) -> bytes:
        self.sock.sendall(line)
        return self.recv_reply()

    def read_until_closed(self) -> bytes:
        """Everything the server sends until it closes (errors after data end the read)."""
        data = b""
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            while chunk := self.sock.recv(4096):
                data += chunk
        return data

    def is_closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sqlite_directory(tmp_path: Path) -> Iterator[Directory]:
    d = start_directory(tmp_path / "state", *FAST_POLICY)
    yield d
    d.stop()


# --------------------------------------------------------------------------- (a) SQLite


def test_sqlite_lookups_over_tls_exact_bytes(sqlite_directory: Directory) -> None:
    d = sqlite_directory
    assert d.cli("register", "@Alice🛠", "vip.ve.atsign.zone:25000").returncode == 0
    c = RootClient(d.port, d.ca)
    try:
        assert c.ask("alice🛠\n".encode()) == b"vip.ve.atsign.zone:25000\r\n@"
        assert c.ask("ALICE🛠\r\n".encode()) == b"vip.ve.atsign.zone:25000\r\n@"
        assert c.ask("@alice🛠\n".encode()) == b"vip.ve.atsign.zone:25000\r\n@"
        assert c.ask(b"nosuchatsign\n") == b"null\r\n@"
        # registered while the connection is open: visible on the next lookup (WAL)
        assert d.cli("register", "bob", "127.0.0.1:6464").returncode == 0
        assert c.ask(b"bob\n") == b"127.0.0.1:6464\r\n@"
        c.sock.sendall(b"@exit\n")
        assert c.is_closed_by_server()
    finally:
        c.close()


def test_dart_style_new_connection_per_lookup(sqlite_directory: Directory) -> None:
    d = sqlite_directory
    assert d.cli("register", "carol", "h.example:1234").returncode == 0
    for _ in range(5):
        c = RootClient(d.port, d.ca)
        assert c.ask(b"carol\n") == b"h.example:1234\r\n@"
        c.sock.sendall(b"@exit\n")
        assert c.is_closed_by_server()
        c.close()


def test_many_misses_are_slowed_but_never_disconnected(sqlite_directory: Directory) -> None:
    d = sqlite_directory
    assert d.cli("register", "bob", "127.0.0.1:6464").returncode == 0
    c = RootClient(d.port, d.ca)
    try:
        t0 = time.monotonic()
        for i in range(12):
            assert c.ask(f"ghost{i}\n".encode()) == b"null\r\n@"
        elapsed = time.monotonic() - t0
        # 2 free, then 0.05 + 0.1 + 0.2 * 8 = 1.75 s of delay
        assert elapsed >= 1.6, elapsed
        t1 = time.monotonic()
        assert c.ask(b"bob\n") == b"127.0.0.1:6464\r\n@"
        assert time.monotonic() - t1 < 0.5  # hits are never delayed
    finally:
        c.close()


def test_plane_ca_is_required(sqlite_directory: Directory) -> None:
    raw = socket.create_connection(("127.0.0.1", sqlite_directory.port), timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


# --------------------------------------------------------------------------- (d) restart


def test_restart_keeps_registrations_and_sigterm_exits_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    d1 = start_directory(state)
    try:
        assert d1.cli("register", "@Dave", "dave.example:7000").returncode == 0
        c = RootClient(d1.port, d1.ca)  # an open connection must not block shutdown
        assert c.ask(b"dave\n") == b"dave.example:7000\r\n@"
        t0 = time.monotonic()
        assert d1.stop() == 0
        assert time.monotonic() - t0 < 5
        assert "shutting down" in d1.log.read_text()
        c.close()
    finally:
        d1.stop()
    ca_before = (state / "tls" / "ca.pem").read_bytes()
    d2 = start_directory(state)
    try:
        assert (state / "tls" / "ca.pem").read_bytes() == ca_before  # same CA, clients keep trust
        c = RootClient(d2.port, d2.ca)
        assert c.ask(b"DAVE\n") == b"dave.example:7000\r\n@"
        c.close()
    finally:
        assert d2.stop() == 0


# --------------------------------------------------------------------------- (e) garbage


OVERLONG = b"error:request line longer than 255 bytes: limit --max-line-bytes 255\r\n@"


def test_garbage_and_oversized_lines_do_not_kill_the_server(sqlite_directory: Directory) -> None:
    d = sqlite_directory
    assert d.cli("register", "erin", "erin.example:1").returncode == 0
    # oversized line: answered with the limit, then that connection is closed
    c = RootClient(d.port, d.ca)
    c.sock.sendall(b"A" * 300 + b"\n")
    assert c.read_until_closed() == OVERLONG
    c.close()
    # 254 characters + CRLF (the case) is 256 bytes: also answered
    c = RootClient(d.port, d.ca)
    c.sock.sendall(b"b" * 254 + b"\r\n")
    assert c.read_until_closed() == OVERLONG
    c.close()
    # a 100 KB line: the server reads on while it answers, so no RST eats the error line
    c = RootClient(d.port, d.ca)
    with contextlib.suppress(OSError):
        c.sock.sendall(b"x" * 100_000)
    assert c.read_until_closed() == OVERLONG
    c.close()
    # oversized without newline, in small pieces
    c = RootClient(d.port, d.ca)
    for _ in range(30):
        try:
            c.sock.sendall(b"z" * 10)
        except (ConnectionError, ssl.SSLError):
            break
    assert c.read_until_closed() == OVERLONG
    c.close()
    # binary garbage, invalid UTF-8, blanks: answered null, connection stays usable
    c = RootClient(d.port, d.ca)
    assert c.ask(b"\xff\xfe\x00\x01\n") == b"null\r\n@"
    assert c.ask(b"a b c\n") == b"null\r\n@"
    assert c.ask(b"\n") == b"null\r\n@"
    assert c.ask(b"erin\n") == b"erin.example:1\r\n@"
    c.close()
    # plaintext to the TLS port, and a TCP connect that never handshakes
    raw = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    raw.sendall(b"alice\n" * 10 + os.urandom(500))
    raw.close()
    idle = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    # the server still answers
    c = RootClient(d.port, d.ca)
    assert c.ask(b"erin\n") == b"erin.example:1\r\n@"
    c.close()
    idle.close()
    assert d.proc.poll() is None
    assert "Traceback" not in d.log.read_text()


# --------------------------------------------------------------------------- (f) limits, hostile


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def raw_connections(port: int, n: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """n TCP connections from `source` that never start TLS."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def wait_until(predicate, timeout: float = 15.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def refused_text(port: int, ca: Path, source: str) -> bytes:
    """What a TLS client from `source` reads after sending a lookup, up to the close."""
    raw = socket.socket()
    raw.bind((source, 0))
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    sock = client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1")
    sock.sendall(b"erin\n")
    data = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := sock.recv(4096):
            data += chunk
    sock.close()
    return data


def test_refused_clients_are_told_which_limit_and_raw_tcp_counts(tmp_path: Path) -> None:
    """Raw TCP counts; a full server evicts the oldest connection never answered (MaxStartups
    style), never one that was answered; refusals and evictions name the limit."""
    d = start_directory(tmp_path / "state", "--max-connections-per-ip", "20",
                        "--max-connections", "40", "--handshake-timeout", "6")
    held: list[RootClient] = []
    try:
        assert d.cli("register", "erin", "erin.example:1").returncode == 0
        # 20 raw TCP sockets that never start TLS take every slot of 127.0.0.1 ...
        hogs = raw_connections(d.port, 20)
        time.sleep(0.3)
        assert refused_text(d.port, d.ca, "127.0.0.1") == (
            b"@error:too many connections from 127.0.0.1: "
            b"limit --max-connections-per-ip 20\r\n@")
        # ... an idle TLS client that never asks, then 19 answered clients fill the total
        idle = RootClient(d.port, d.ca, source="127.0.0.2")
        for _ in range(19):
            held.append(RootClient(d.port, d.ca, source="127.0.0.2"))
            assert held[-1].ask(b"erin\n") == b"erin.example:1\r\n@"
        time.sleep(0.3)
        # a third address is served anyway: it takes the slot of the oldest raw socket
        c = RootClient(d.port, d.ca, source="127.0.0.3")
        assert c.ask(b"erin\n") == b"erin.example:1\r\n@"
        held.append(c)
        assert wait_until(lambda: hogs[0].recv(1) == b"", 10)  # no TLS: closed, no words
        # the handshake deadline (6 s) frees the other silent sockets' slots
        assert wait_until(lambda: hogs[1].recv(1) == b"", 10)
        for s in hogs:
            s.close()
        for _ in range(19):
            held.append(RootClient(d.port, d.ca, source="127.0.0.4"))
            assert held[-1].ask(b"erin\n") == b"erin.example:1\r\n@"
        # 40 open: a new one takes the slot of the idle TLS client, which is told why
        c = RootClient(d.port, d.ca, source="127.0.0.3")
        assert c.ask(b"erin\n") == b"erin.example:1\r\n@"
        held.append(c)
        assert idle.read_until_closed() == (
            b"error:server busy: 40 connections open, limit --max-connections 40; the oldest "
            b"connection not yet answered is closed to make room\r\n@")
        # every open connection was answered: nothing to evict, a new one is refused
        assert refused_text(d.port, d.ca, "127.0.0.5") == (
            b"@error:server busy: 40 connections open, limit --max-connections 40\r\n@")
        assert all(h.ask(b"erin\n") == b"erin.example:1\r\n@" for h in held)
        # the project's client names the limit to its user
        from noports.atclient import AtClientError, find_secondary
        with pytest.raises(AtClientError, match="limit --max-connections 40"):
            find_secondary("127.0.0.1", d.port, "@erin", client_context(d.ca))
        import asyncio

        from noports.atclient.aio import lookup_secondary
        with pytest.raises(AtClientError, match="refused the lookup of @erin: server busy"):
            asyncio.run(lookup_secondary(("127.0.0.1", d.port), "@erin", client_context(d.ca),
                                         use_cache=False))
        log = d.log.read_text()
        assert "refusing connection from 127.0.0.1: too many connections" in log
    finally:
        for h in held:
            h.close()
        d.stop()


def test_slow_and_silent_clients_are_told_the_request_deadline(tmp_path: Path) -> None:
    d = start_directory(tmp_path / "state", "--request-timeout", "2")
    try:
        assert d.cli("register", "erin", "erin.example:1").returncode == 0
        expected = (b"error:no complete request line within 2 s: "
                    b"limit --request-timeout 2\r\n@")
        silent = RootClient(d.port, d.ca)  # TLS done, never asks
        slow = RootClient(d.port, d.ca)  # slowloris: one byte every 0.3 s, never a newline
        for _ in range(4):
            slow.sock.sendall(b"e")
            time.sleep(0.3)
        assert silent.read_until_closed() == expected
        assert slow.read_until_closed() == expected
        # a client that asks in time is unaffected, and may stay idle between requests
        c = RootClient(d.port, d.ca)
        assert c.ask(b"erin\n") == b"erin.example:1\r\n@"
        time.sleep(2.5)  # idle between answered requests: no deadline by default
        assert c.ask(b"erin\n") == b"erin.example:1\r\n@"
        c.close()
    finally:
        d.stop()


def test_flood_of_raw_tcp_slowloris_and_garbage_while_a_client_is_served(tmp_path: Path) -> None:
    """Issue 9: 4,000 TCP opens that never start TLS took the directory to 1.4 GB, for good.

    Default limits, except shorter deadlines so the test is quick. The attacker is 127.0.0.1;
    the legitimate client (127.0.0.2) looks up in a loop, new connection per lookup (Dart
    style), during the whole attack, and every lookup must be answered.
    """
    d = start_directory(tmp_path / "state", "--handshake-timeout", "3", "--request-timeout", "3")
    assert d.cli("register", "erin", "erin.example:1").returncode == 0
    import threading

    answers: list[bytes] = []
    errors: list[str] = []
    stop = threading.Event()

    def legit() -> None:
        while not stop.is_set():
            try:
                raw = socket.socket()
                raw.bind(("127.0.0.2", 0))
                raw.settimeout(10)
                raw.connect(("127.0.0.1", d.port))
                sock = client_context(d.ca).wrap_socket(raw, server_hostname="127.0.0.1")
                data = b""
                while data != b"@":
                    data += sock.recv(1)
                sock.sendall(b"erin\n")
                data = b""
                while not data.endswith(b"\r\n@"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError(f"closed after {data!r}")
                    data += chunk
                answers.append(data)
                sock.close()
            except Exception as exc:  # recorded, asserted below
                errors.append(repr(exc))
            time.sleep(0.02)

    before = rss_kib(d.proc.pid)
    t = threading.Thread(target=legit, daemon=True)
    t.start()
    try:
        hogs = raw_connections(d.port, 4000)
        slow = [RootClient(d.port, d.ca, source="127.0.0.3") for _ in range(20)]
        for c in slow:
            c.sock.sendall(b"e")
        garbage = RootClient(d.port, d.ca, source="127.0.0.4")
        garbage.sock.sendall(bytes(b for b in os.urandom(600) if b != 10)[:300])
        peak = rss_kib(d.proc.pid)
        # beyond the per-IP limit (512 by default) the server closed the raw sockets itself
        closed_by_server = 0
        for s in hogs[600:]:
            s.settimeout(5)
            with contextlib.suppress(OSError):
                if s.recv(1) == b"":
                    closed_by_server += 1
        assert closed_by_server == len(hogs) - 600
        for c in slow:
            assert c.read_until_closed().startswith(b"error:no complete request line")
        assert garbage.read_until_closed() == OVERLONG
        time.sleep(1)
        peak = max(peak, rss_kib(d.proc.pid))
        for s in hogs:
            s.close()
    finally:
        stop.set()
        t.join(15)
    assert not errors, errors[:5]
    assert len(answers) >= 20 and set(answers) == {b"erin.example:1\r\n@"}
    # generous bound: HEAD grew by 1.4 GB; 512 held handshakes cost well under 100 MB
    assert peak - before < 150_000, (before, peak)
    assert d.proc.poll() is None
    assert d.stop() == 0
    assert "Traceback" not in d.log.read_text()


def test_200_concurrent_lookups_from_one_controller_pass_default_limits(
        sqlite_directory: Directory) -> None:
    """200 sshnp sessions started at once each look up the directory: none may be refused."""
    from concurrent.futures import ThreadPoolExecutor

    from noports.atclient import find_secondary

    d = sqlite_directory
    assert d.cli("register", "erin", "erin.example:1").returncode == 0
    ctx = client_context(d.ca)
    barrier = __import__("threading").Barrier(200)

    def one(_: int) -> tuple[str, int]:
        barrier.wait(30)
        return find_secondary("127.0.0.1", d.port, "@erin", ctx, timeout=30)

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    assert results == [("erin.example", 1)] * 200
    assert d.stop() == 0
    log = d.log.read_text()
    assert "refusing connection" not in log
    peak = re.search(r"connections at peak: (\d+) open, (\d+) from one source", log)
    assert peak is not None and 1 <= int(peak.group(2)) <= 200, peak


# --------------------------------------------------------------------------- CLI errors


def test_serve_errors_are_one_line_exit_2(tmp_path: Path, sqlite_directory: Directory) -> None:
    busy = run_cli("serve", "--port", str(sqlite_directory.port), "--state-dir", str(tmp_path))
    assert busy.returncode == 2
    assert "cannot listen on 127.0.0.1:" in busy.stderr and "Traceback" not in busy.stderr
    nored = run_cli("serve", "--port", "0", "--state-dir", str(tmp_path),
                    "--store", "redis://:pw@127.0.0.1:1/0")
    assert nored.returncode == 2
    assert nored.stderr.strip().splitlines()[-1].startswith("atdirectory: error: cannot use Redis")
    assert "Traceback" not in nored.stderr and ":pw@" not in nored.stderr


# --------------------------------------------------------------------------- (b) Redis


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed (apt-get install redis-server)")
    redis = pytest.importorskip("redis")
    port = free_port()
    rdir = tmp_path / "redis"
    rdir.mkdir()
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(rdir),
                             "--requirepass", "foobared"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:foobared@127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_store_official_layout(tmp_path: Path, redis_url: str) -> None:
    import redis

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    # exactly what the official VE loads: `set alice🛠 vip.ve.atsign.zone:25000`
    r.set("alice🛠", "vip.ve.atsign.zone:25000")
    d = start_directory(tmp_path / "state", "--store", redis_url)
    try:
        assert r.get("ping") == "pong"  # sanity key written on start
        assert d.cli("register", "@Bob", "bob.example:6464", store=redis_url).returncode == 0
        assert r.get("bob") == "bob.example:6464"  # plain string key, no '@', lower-case
        c = RootClient(d.port, d.ca)
        assert c.ask("Alice🛠\n".encode()) == b"vip.ve.atsign.zone:25000\r\n@"
        assert c.ask(b"bob\n") == b"bob.example:6464\r\n@"
        assert c.ask(b"ping\n") == b"null\r\n@"  # the sanity key is not an atSign
        assert c.ask(b"nobody\n") == b"null\r\n@"
        c.close()
        listed = d.cli("list", "--json", store=redis_url)
        assert json.loads(listed.stdout) == {"@alice🛠": "vip.ve.atsign.zone:25000",
                                             "@bob": "bob.example:6464"}
        assert d.cli("unregister", "bob", store=redis_url).returncode == 0
        assert r.get("bob") is None
        refused = d.cli("register", "ping", "h:1", store=redis_url)
        assert refused.returncode == 2 and "sanity-check key" in refused.stderr
        assert "foobared" not in d.log.read_text()
    finally:
        assert d.stop() == 0


def test_redis_wrong_sanity_value_is_refused(tmp_path: Path, redis_url: str) -> None:
    import redis

    redis.Redis.from_url(redis_url).set("ping", "not-pong")
    res = run_cli("serve", "--port", "0", "--state-dir", str(tmp_path), "--store", redis_url)
    assert res.returncode == 2 and "sanity check failed" in res.stderr
    assert "Traceback" not in res.stderr and "foobared" not in res.stderr


# --------------------------------------------------------------------------- (c) Python SDK

SDK_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from at_client.common import AtSign
    from at_client.connections.atrootconnection import AtRootConnection
    from at_client.exception.atexception import AtSecondaryNotFoundException

    port = int(sys.argv[1])
    root = AtRootConnection.get_instance(host="127.0.0.1", port=port)
    out = {"hits": {}, "misses": 0, "socks": set()}

    def sock_id():
        return root._secure_root_socket.getsockname()[1]

    for name in ["@alice🛠", "@bob", "@ALICE🛠"]:
        addr = root.find_secondary(AtSign(name))
        out["hits"][name] = f"{addr.host}:{addr.port}"
        out["socks"].add(sock_id())
    t0 = time.monotonic()
    for i in range(15):
        try:
            root.find_secondary(AtSign(f"@ghost{i}"))
        except AtSecondaryNotFoundException:
            out["misses"] += 1
        out["socks"].add(sock_id())
    out["miss_seconds"] = time.monotonic() - t0
    addr = root.find_secondary(AtSign("@bob"))
    out["after"] = f"{addr.host}:{addr.port}"
    out["socks"].add(sock_id())
    out["connected"] = root.is_connected()
    out["socks"] = sorted(out["socks"])
    print(json.dumps(out))
""")


def test_python_sdk_root_client_one_connection(sqlite_directory: Directory,
                                               tmp_path: Path) -> None:
    pytest.importorskip("at_client")
    d = sqlite_directory
    assert d.cli("register", "@alice🛠", "vip.ve.atsign.zone:25000").returncode == 0
    assert d.cli("register", "@bob", "127.0.0.1:6464").returncode == 0
    script = tmp_path / "sdk_root.py"
    script.write_text(SDK_SCRIPT)
    env = {**os.environ, "SSL_CERT_FILE": str(d.ca)}
    res = subprocess.run([sys.executable, str(script), str(d.port)], capture_output=True,
                         text=True, timeout=20, env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["hits"] == {"@alice🛠": "vip.ve.atsign.zone:25000", "@bob": "127.0.0.1:6464",
                           "@ALICE🛠": "vip.ve.atsign.zone:25000"}
    assert out["misses"] == 15
    assert out["after"] == "127.0.0.1:6464"
    assert out["connected"] is True
    assert len(out["socks"]) == 1  # one TCP connection for everything
    assert out["miss_seconds"] >= 1.5  # the policy did slow the misses down
    assert d.log.read_text().count("server: connection from 127.0.0.1") == 1


def test_connection_cap_per_ip_refuses_only_new_connections(tmp_path: Path) -> None:
    d = start_directory(tmp_path / "state", "--max-connections-per-ip", "2")
    try:
        assert d.cli("register", "frank", "f.example:2").returncode == 0
        a, b = RootClient(d.port, d.ca), RootClient(d.port, d.ca)
        refused = RootClient(d.port, d.ca)  # TLS and the prompt still work: it is told why
        assert refused.ask(b"frank\n") == (b"error:too many connections from 127.0.0.1: "
                                           b"limit --max-connections-per-ip 2\r\n@")
        assert refused.is_closed_by_server()
        refused.close()
        assert a.ask(b"frank\n") == b"f.example:2\r\n@"  # open connections are unaffected
        b.close()
        deadline = time.monotonic() + 5
        while True:  # the server notices b's close asynchronously
            c = RootClient(d.port, d.ca)
            reply = c.ask(b"frank\n")
            if not reply.startswith(b"error:too many connections"):
                break
            c.close()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert reply == b"f.example:2\r\n@"
        a.close()
        c.close()
    finally:
        assert d.stop() == 0
