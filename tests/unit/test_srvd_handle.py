"""Srvd.handle with a fake atClient and a fake rendezvous: keys fetched, authenticators
bound to the right atSign, reply sent exactly once with the reference metadata."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from noports.npproto import relay_auth_line
from noports.npproto.keys import relay_request_key
from noports.relay.server import SessionSummary
from noports.relay.srvd import REPLY_TTL_MS, REPLY_TTLN_MS, Srvd, SrvdPolicy

KEYS = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "npproto" /
                   "test_keys.json").read_text())
PUB = {"@client": KEYS["client"]["publicKey"], "@device": KEYS["device"]["publicKey"]}
PRIV = {"@client": KEYS["client"]["privateKey"], "@device": KEYS["device"]["privateKey"]}
SID = "b3bbf23a-bf85-498d-87d5-cd832931d092"
CN = "2024-09-24T00:34:28.652988"
KEY = relay_request_key("@relay", "orac", "@client")


def m1(sid: str = SID, **over: Any) -> str:
    d = {"sessionId": sid, "atSignA": "@client", "atSignB": "@device",
         "authenticateSocketA": True, "authenticateSocketB": True, "clientNonce": CN, **over}
    return json.dumps(d)


class FakeClient:
    def __init__(self, fail_notify: bool = False) -> None:
        self.notified: list[tuple[str, str, str, dict[str, Any]]] = []
        self.fail_notify = fail_notify
        self.lookups: list[str] = []

    async def public_key(self, atsign: str) -> str:
        self.lookups.append(atsign)
        if atsign not in PUB:
            raise LookupError(atsign)
        return PUB[atsign]

    async def notify(self, to: str, key_name: str, value: str, **kw: Any) -> str:
        if self.fail_notify:
            raise ConnectionError("down")
        self.notified.append((to, key_name, value, kw))
        return "id"


class FakeRelay:
    def __init__(self) -> None:
        self.sessions: dict[str, tuple[Any, Any]] = {}
        self.closed: list[str] = []
        self.next_port = 40000

    async def open_session(self, sid: str, auth_a: Any, auth_b: Any) -> tuple[int, int]:
        if sid in self.sessions:
            raise ValueError("already open")
        self.sessions[sid] = (auth_a, auth_b)
        self.next_port += 2
        return self.next_port - 1, self.next_port

    def close_session(self, sid: str, reason: str = "") -> bool:
        self.closed.append(sid)
        return self.sessions.pop(sid, None) is not None


def make(**policy: Any) -> tuple[Srvd, FakeClient, FakeRelay]:
    client, relay = FakeClient(), FakeRelay()
    return Srvd(client, SrvdPolicy("@relay", **policy), "10.9.9.2", relay=relay), client, relay


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_accepted_request_replies_and_binds_each_side_to_its_key() -> None:
    srvd, client, relay = make(allowed=frozenset({"@client"}))
    reply = run(srvd.handle(KEY, "@client", m1()))
    assert reply is not None
    host, pa, pb, rn = reply.split(",")
    assert (host, int(pa), int(pb)) == ("10.9.9.2", 40001, 40002)
    assert client.notified == [("@client", f"{SID}.sshrvd", reply,
                                {"namespace": None, "ttl_ms": REPLY_TTL_MS,
                                 "ttln_ms": REPLY_TTLN_MS})]
    assert sorted(client.lookups) == ["@client", "@device"]
    auth_a, auth_b = relay.sessions[SID]
    line_a = relay_auth_line(SID, CN, rn, PRIV["@client"]).rstrip(b"\n")
    line_b = relay_auth_line(SID, CN, rn, PRIV["@device"]).rstrip(b"\n")
    assert auth_a(line_a) and auth_b(line_b)
    assert not auth_a(line_b) and not auth_b(line_a)  # swapped keys
    stale = relay_auth_line(SID, CN, "2020-01-01T00:00:00.000", PRIV["@client"]).rstrip(b"\n")
    assert not auth_a(stale)  # another rvdNonce
    assert not auth_a(b"garbage") and not auth_a(b"")


def test_unauthenticated_sides_get_no_authenticator_and_no_key_lookup() -> None:
    srvd, client, relay = make()
    assert run(srvd.handle(KEY, "@client", m1(authenticateSocketB=False))) is not None
    auth_a, auth_b = relay.sessions[SID]
    assert auth_a is not None and auth_b is None and client.lookups == ["@client"]


def test_refusals_of_strangers_and_unreadable_requests_send_nothing() -> None:
    srvd, client, relay = make(allowed=frozenset({"@client"}))
    other = relay_request_key("@relay", "orac", "@mallory")
    assert run(srvd.handle(other, "@mallory", m1(atSignA="@mallory"))) is None
    assert run(srvd.handle(KEY, "@client", "{")) is None  # no session id to answer to
    assert run(srvd.handle(KEY, "@client", None)) is None  # undecryptable
    spoofed = relay_request_key("@relay", "orac", "@device")
    assert run(srvd.handle(spoofed, "@client", m1())) is None
    assert client.notified == [] and relay.sessions == {} and srvd.refused == 4


def nacks(client: FakeClient) -> list[tuple[str, str, str]]:
    return [(to, k, v) for to, k, v, _kw in client.notified if k.startswith("nack.")]


def test_refusals_of_an_allowed_sender_are_nacked_with_the_reason() -> None:
    srvd, client, relay = make(allowed=frozenset({"@client"}), require_socket_auth=True)
    assert run(srvd.handle(KEY, "@client", m1(atSignA="@device"))) is None
    assert run(srvd.handle(KEY, "@client", m1(authenticateSocketB=False))) is None
    assert nacks(client) == [
        ("@client", f"nack.{SID}.sshrvd", "atSignA @device is not the sender @client"),
        ("@client", f"nack.{SID}.sshrvd", "the request disables socket authentication, "
                                          "which this relay requires (srvd "
                                          "--require-socket-auth)")]
    assert client.notified[0][3] == {"namespace": None, "ttl_ms": REPLY_TTL_MS,
                                     "ttln_ms": REPLY_TTLN_MS}
    assert relay.sessions == {} and srvd.nacked == 2


def test_duplicate_session_id_refused_even_after_close() -> None:
    srvd, client, relay = make()

    async def go() -> list[str | None]:
        first = await srvd.handle(KEY, "@client", m1())
        dup = await srvd.handle(KEY, "@client", m1())
        relay.close_session(SID)
        srvd.session_closed(SessionSummary(SID, 1, 2, 0.1, 0, 0, 0, "test"))
        again = await srvd.handle(KEY, "@client", m1())
        return [first, dup, again]

    first, dup, again = run(go())
    assert first is not None and dup is None and again is None
    assert len(client.notified) == 1


def test_concurrent_duplicates_open_one_session() -> None:
    srvd, client, relay = make()

    async def go() -> list[str | None]:
        return await asyncio.gather(*(srvd.handle(KEY, "@client", m1()) for _ in range(5)))

    assert sum(r is not None for r in run(go())) == 1 and len(relay.sessions) == 1


def test_unknown_device_key_refuses_without_opening_ports() -> None:
    srvd, client, relay = make()
    assert run(srvd.handle(KEY, "@client", m1(atSignB="@nobody"))) is None
    assert relay.sessions == {}
    assert nacks(client) == [("@client", f"nack.{SID}.sshrvd", "cannot fetch the public key "
                              "of @nobody (side B) to authenticate its socket")]


def test_failed_reply_closes_the_session() -> None:
    srvd, client, relay = make()
    client.fail_notify = True
    assert run(srvd.handle(KEY, "@client", m1())) is None
    assert relay.closed == [SID] and relay.sessions == {}


def test_per_sender_cap_counts_open_sessions() -> None:
    srvd, client, relay = make(max_sessions_per_sender=2)
    sids = [f"b3bbf23a-bf85-498d-87d5-cd832931d0{i:02d}" for i in range(3)]

    async def go() -> list[str | None]:
        return [await srvd.handle(KEY, "@client", m1(s)) for s in sids]

    assert [r is not None for r in run(go())] == [True, True, False]
    assert nacks(client) == [("@client", f"nack.{sids[2]}.sshrvd", "@client already has 2 "
                              "sessions (max 2; srvd --max-sessions-per-atsign)")]


def test_a_session_being_answered_counts_once() -> None:
    """The reply is sent while the session is already open: counting it twice refused
    requests below the limit (issue 9: '65 sessions (max 64)')."""
    srvd, client, relay = make(max_sessions_per_sender=2)
    gate: list[asyncio.Event] = []  # made inside the loop (Python 3.8/3.9 bind it at creation)
    counts: list[int] = []
    real_notify = client.notify

    async def slow_notify(to: str, key_name: str, value: str, **kw: Any) -> str:
        counts.append(srvd._sender_sessions("@client"))
        await gate[0].wait()
        return await real_notify(to, key_name, value, **kw)

    client.notify = slow_notify  # type: ignore[method-assign]
    sids = [f"b3bbf23a-bf85-498d-87d5-cd832931d0{i:02d}" for i in range(2)]

    async def go() -> list[str | None]:
        gate.append(asyncio.Event())
        first = asyncio.ensure_future(srvd.handle(KEY, "@client", m1(sids[0])))
        while not counts:
            await asyncio.sleep(0)
        second = asyncio.ensure_future(srvd.handle(KEY, "@client", m1(sids[1])))
        while len(counts) < 2:
            await asyncio.sleep(0)
        gate[0].set()
        return [await first, await second]

    assert all(r is not None for r in run(go()))
    assert counts == [1, 2]


def test_relay_full_is_nacked_with_the_flag() -> None:
    from noports.relay.server import RelayConfig

    async def go() -> FakeClient:
        client = FakeClient()
        srvd = Srvd(client, SrvdPolicy("@relay"), "127.0.0.1",
                    relay_config=RelayConfig(bind_host="127.0.0.1", max_sessions=1))
        try:
            assert await srvd.handle(KEY, "@client", m1(SID)) is not None
            other = "b3bbf23a-bf85-498d-87d5-cd832931d099"
            assert await srvd.handle(KEY, "@client", m1(other)) is None
        finally:
            await srvd.aclose()
        return client

    client = run(go())
    assert nacks(client) == [("@client", "nack.b3bbf23a-bf85-498d-87d5-cd832931d099.sshrvd",
                              "the relay is full: 1 sessions open (max 1; srvd --max-sessions)")]


def test_legacy_request_replies_null_nonce() -> None:
    srvd, client, relay = make()
    key = "@relay:orac.sshrvd@client"
    reply = run(srvd.handle(key, "@client", SID))
    assert reply is not None and reply.endswith(",null")
    assert relay.sessions[SID] == (None, None)


def test_dispatch_survives_handler_bugs() -> None:
    srvd, client, relay = make()

    async def boom(*a: Any) -> None:
        raise RuntimeError("bug")

    async def go() -> None:
        srvd.handle = boom  # type: ignore[method-assign]
        for _ in range(100):  # more than max_inflight: the semaphore must be released
            await srvd.dispatch(KEY, "@client", m1())
        await asyncio.sleep(0.05)
        assert not srvd._tasks

    run(go())


@pytest.mark.parametrize("value", [None, "", "x" * 100_000])
def test_serve_loop_values_never_crash(value: str | None) -> None:
    srvd, client, relay = make()
    assert run(srvd.handle(KEY, "@client", value)) is None


def test_the_client_reads_the_nack_as_the_relays_refusal() -> None:
    """Both ends of the NACK: the key srvd sends is the one the client classifies as a
    refusal of that session, and the text it shows is the relay's, made safe to print."""
    from noports.client.errors import EXIT_RELAY, relay_refused
    from noports.npproto.keys import parse_client_key
    from noports.relay.srvd import nack_key_name

    ck = parse_client_key(f"@client:{nack_key_name(SID)}@relay")
    assert (ck.kind, ck.session_id, ck.sender) == ("relay_nack", SID, "@relay")
    err = relay_refused("@relay", "@client already has 64 sessions (max 64; srvd "
                                  "--max-sessions-per-atsign)")
    assert str(err) == ("relay: relay @relay refused: @client already has 64 sessions "
                        "(max 64; srvd --max-sessions-per-atsign)")
    assert err.exit_code == EXIT_RELAY
    hostile = relay_refused("@relay", "\x1b[2J\x1b]0;owned\x07" + "x" * 5000)
    assert "\x1b" not in str(hostile) and "\x07" not in str(hostile)
    assert len(hostile.message) < 400
