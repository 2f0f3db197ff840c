"""Bounded socket fuzzer against the real atdirectory and atserver over TLS.

Fixed seed, a time budget of a few seconds per server: bursts of random and mutated lines
(verbs with junk, binary, huge, unicode, no newline, many CRLFs) on concurrent connections.
After each burst a legitimate client must be answered, and at the end both servers must still
run without a traceback in their logs. Not a timing test: the deadlines only catch hangs.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from noports import crypto
from noports.keys.ca import client_context
from tests.harness.plane import Plane

pytestmark = pytest.mark.integration

SEED = 20261205
# noop:<more than 4300 digits> hits int()'s digit limit inside the atserver (an internal error,
# logged with a traceback, connection answered); fixed in parallel on the atserver branch.
BUDGET_S = 8.0  # per server
CONNECTIONS_PER_BURST = 12
VERBS = [b"from:", b"cram:", b"pkam:", b"lookup:", b"plookup:", b"llookup:", b"update:",
         b"delete:", b"scan", b"notify:", b"monitor", b"stats:", b"noop:", b"info", b"@exit",
         b"sync:", b"pol", b"alice", b"@", b"", b"notify:all:", b"notify:ttln:"]


def fuzz_line(rng: random.Random) -> bytes:
    """One random or mutated request (not always a complete line)."""
    kind = rng.randrange(8)
    verb = rng.choice(VERBS)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 600)))
    if kind == 1:
        return verb + bytes(rng.randrange(32, 127) for _ in range(rng.randint(0, 300))) + b"\n"
    if kind == 2:
        return verb + b":" * rng.randint(1, 3000) + b"\n"
    if kind == 3:
        return verb + ("🛠" * rng.randint(1, 2000)).encode() + b"\n"
    if kind == 4:
        return verb + b"x" * rng.randint(1_000, 200_000) + b"\n"
    if kind == 5:
        return verb + b"\r\n" * rng.randint(1, 50)
    if kind == 6:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 20_000)))
        return verb + digits.encode() + b"\n"  # huge numbers (ttln, noop)
    return verb + b"\x00\xff\xfe" * rng.randint(1, 200)  # no newline


async def burst(host: str, port: int, ctx: ssl.SSLContext, rng: random.Random) -> None:
    """Concurrent connections, each sending a few fuzz lines and reading a little."""
    plans = [[fuzz_line(rng) for _ in range(rng.randint(1, 4))]
             for _ in range(CONNECTIONS_PER_BURST)]

    async def one(lines: list[bytes]) -> None:
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), 10)
        except (OSError, ssl.SSLError, asyncio.TimeoutError):
            return
        try:
            for line in lines:
                w.write(line)
                await asyncio.wait_for(w.drain(), 5)
            await asyncio.wait_for(r.read(65536), 0.5)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ValueError):
            pass
        finally:
            w.close()

    await asyncio.gather(*(one(p) for p in plans))


def ask(host: str, port: int, ctx: ssl.SSLContext, line: bytes) -> bytes:
    """A legitimate client: prompt, one request, the reply line (generous hang deadline)."""
    raw = socket.create_connection((host, port), timeout=15)
    with ctx.wrap_socket(raw, server_hostname=host) as sock:
        data = b""
        while not data.startswith(b"@"):
            data += sock.recv(1)
        sock.sendall(line)
        data = b""
        while b"\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.split(b"\n", 1)[0].rstrip(b"\r")


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Plane, int]]:
    pl = Plane(Path(tmp_path_factory.mktemp("fuzzplane")))
    try:
        pl.start_directory()
        server = pl.start_atserver("s1", {"@alice": crypto.generate_cram_secret()})
        yield pl, server.ports["@alice"]
    finally:
        pl.stop()


def fuzz_server(host: str, port: int, ctx: ssl.SSLContext, seed: int,
                legit_line: bytes, legit_ok) -> int:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    deadline = time.monotonic() + BUDGET_S
    bursts = 0
    while time.monotonic() < deadline:
        asyncio.run(burst(host, port, ctx, rng))
        bursts += 1
        reply = ask(host, port, ctx, legit_line)
        assert legit_ok(reply), f"after burst {bursts} (seed {seed}): {reply[:200]!r}"
    return bursts


def test_fuzzed_atdirectory_keeps_answering(plane: tuple[Plane, int]) -> None:
    pl, alice_port = plane
    d = pl.directory
    assert d is not None
    ctx = client_context(pl.tls.ca_cert)
    expected = f"127.0.0.1:{alice_port}".encode()
    bursts = fuzz_server(d.host, d.port, ctx, SEED, b"alice\n", lambda r: r == expected)
    assert bursts >= 3
    assert d.proc.popen.poll() is None
    tb = [i for i, x in enumerate(d.proc.lines) if "Traceback" in x]
    assert not tb, "\n".join(d.proc.lines[tb[0] - 2:tb[0] + 30])


def test_fuzzed_atserver_keeps_answering(plane: tuple[Plane, int]) -> None:
    pl, alice_port = plane
    ctx = client_context(pl.tls.ca_cert)
    bursts = fuzz_server("127.0.0.1", alice_port, ctx, SEED + 1, b"from:@alice\n",
                         lambda r: r.startswith(b"data:"))
    assert bursts >= 3
    server = pl.servers[0]
    assert server.proc.popen.poll() is None
    lines = server.proc.lines
    tb = [i for i, x in enumerate(lines) if "Traceback" in x]
    assert not tb, "\n".join(lines[tb[0] - 2:tb[0] + 30])
