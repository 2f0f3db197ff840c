"""Single-port relay (srvd --443) over real loopback sockets: squatters cannot stop pairings.

The rendezvous, its single-port listener and ESCR gate, and both connectors
(noports.relay.pump.connect_relay with EscrAuth) are the real code; only the atServer
lookup of the signing keys is an in-memory table (the end-to-end test with the real plane
is test_restricted_egress.py). Issue 9's squatting case: hostile sockets connect to the one
port first - idle, garbage, huge lines, a replayed response, a response for the session
signed by the wrong atSign - and every real pair still meets and carries its bytes.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from noports import crypto
from noports.npproto import escr
from noports.npproto.keys import new_session_id
from noports.relay import RelayConfig, Rendezvous, SessionPolicy
from noports.relay.pump import EscrAuth, RelayAuthRefused, connect_relay
from noports.relay.singleport import EscrSession, SinglePortListener

pytestmark = pytest.mark.integration

KEYS = {a: crypto.generate_rsa_keypair() for a in ("@alice", "@bob", "@mallory")}
SESSIONS = 50
IDLE_SQUATTERS = 16


async def lookup(atsign: str, name: str) -> str:
    assert name == "_apsk.primary.a.__e"
    return KEYS[atsign][0]


def auth(sid: str, key: str, atsign: str, side_a: bool) -> EscrAuth:
    return EscrAuth(sid, key, side_a, KEYS[atsign][1], escr.apsk_uri(atsign))


async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def drain(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    out = b""
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), timeout)
        if not chunk:
            return out
        out += chunk


async def _scenario() -> dict[str, object]:
    cfg = RelayConfig(bind_host="127.0.0.1", policy=SessionPolicy(auth_timeout=3.0))
    async with Rendezvous(cfg) as rv:
        rv.key_lookup = lookup
        listener = SinglePortListener(rv, "127.0.0.1", 0)
        listener.start()
        port = listener.port
        sessions = []
        for _ in range(SESSIONS):
            sid, key = new_session_id(), escr.new_relay_auth_key()
            await rv.open_escr_session(EscrSession(sid, key, "@alice", "@bob"), (port, port))
            sessions.append((sid, key))

        # squatters arrive first and stay: idle sockets, garbage, an oversized line
        idle = [await raw(port) for _ in range(IDLE_SQUATTERS)]
        hostile: list[tuple[str, asyncio.StreamReader]] = []
        for payload in (b"GET / HTTP/1.1\r\n\r\n", b"\x00" * 100 + b"\n", b"x" * 5000,
                        f"{sessions[0][0]}:bm90IGpzb24=\n".encode()):
            r, w = await raw(port)
            w.write(payload)
            hostile.append(("garbage", r))
        # mallory knows nothing but a session id; then mallory with the session key (a
        # leaked key) claiming the device's side: both refused
        sid0, key0 = sessions[0]
        wrong_key = auth(sid0, escr.new_relay_auth_key(), "@mallory", False)
        leaked = auth(sid0, key0, "@mallory", False)
        refusals = []
        for a in (wrong_key, leaked):
            try:
                await connect_relay("127.0.0.1", port, a, timeout=5)
                refusals.append("accepted!")
            except RelayAuthRefused as exc:
                refusals.append(str(exc))

        async def pair(i: int) -> float:
            sid, key = sessions[i]
            t0 = time.monotonic()
            a, b = await asyncio.gather(
                connect_relay("127.0.0.1", port, auth(sid, key, "@alice", True), timeout=10),
                connect_relay("127.0.0.1", port, auth(sid, key, "@bob", False), timeout=10))
            loop = asyncio.get_running_loop()
            msg = f"hello {i}".encode()
            await loop.sock_sendall(a, msg)
            got = await asyncio.wait_for(loop.sock_recv(b, 100), 10)
            await loop.sock_sendall(b, got[::-1])
            back = await asyncio.wait_for(loop.sock_recv(a, 100), 10)
            a.close()
            b.close()
            assert (got, back) == (msg, msg[::-1]), (i, got, back)
            return time.monotonic() - t0

        times = await asyncio.gather(*(pair(i) for i in range(SESSIONS)))
        # a replayed response (recorded from a real connector) fails on a fresh challenge
        r, w = await raw(port)
        challenge = (await r.readline()).decode().strip()
        line = auth(*sessions[1], "@alice", True).respond(challenge)
        r2, w2 = await raw(port)
        await r2.readline()
        w2.write(line)
        replay_answer = await drain(r2)
        w.close()
        got_hostile = [(kind, await drain(rd)) for kind, rd in hostile]
        idle_got = []
        for rd, wr in idle:  # idle squatters: only the challenge, then closed at the deadline
            idle_got.append(await drain(rd))
            wr.close()
        stats = rv.stats()
        gate = rv.escr_gate()
        listener.close()
        return {"times": times, "refusals": refusals, "hostile": got_hostile,
                "idle": idle_got, "replay": replay_answer, "stats": stats,
                "accepted": gate.accepted, "refused": gate.refused}


def test_fifty_sessions_pair_through_one_port_with_squatters_attached() -> None:
    res = asyncio.run(_scenario())
    times = res["times"]
    assert len(times) == SESSIONS  # every pair met and carried bytes both ways
    print(f"\n{SESSIONS} single-port pairings with {IDLE_SQUATTERS} idle squatters and 4 "
          f"hostile sockets: max {max(times):.3f}s")
    assert all("Socket auth failed" in r for r in res["refusals"]), res["refusals"]
    for kind, data in res["hostile"]:
        # a challenge line, then the same refusal whatever was wrong (or nothing at all)
        lines = data.split(b"\n")
        assert len(base64_challenge(lines[0])) == 32, (kind, data)
        assert data.count(b"\n") <= 2 and b"ok" not in lines[1:], (kind, data)
    for data in res["idle"]:
        assert data.count(b"\n") == 1 and len(base64_challenge(data.strip())) == 32
    assert b"Socket auth failed" in res["replay"]
    assert res["accepted"] == 2 * SESSIONS


def base64_challenge(line: bytes) -> bytes:
    import base64
    return base64.b64decode(line, validate=True)


def test_busy_port_is_named() -> None:
    async def go() -> str:
        async with Rendezvous(RelayConfig(bind_host="127.0.0.1")) as rv:
            first = SinglePortListener(rv, "127.0.0.1", 0)
            try:
                SinglePortListener(rv, "127.0.0.1", first.port)
            except OSError as exc:
                return str(exc)
            finally:
                first.close()
        return "bound twice"

    assert "in use" in asyncio.run(go()).lower()
