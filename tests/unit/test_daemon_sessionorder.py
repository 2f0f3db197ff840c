"""The daemon <-> session host pipe messages (docs/decisions/0024-sessions-outlive-daemon.md):
round trips, and every malformed line refused with a message, never guessed at."""

from __future__ import annotations

import json

import pytest

from noports import crypto
from noports.daemon.sessionorder import MAX_LINE, HostEvent, OrderError, SessionOrder
from noports.npproto.escr import EscrAuth

SID = "0b6f4a1e-2f53-4c1b-9a43-7cc3f1f0a0de"


def order(**kw) -> SessionOrder:
    base = dict(session_id=SID, client="@alice", relay_host="10.0.0.2", relay_port=4242,
                auth_line=b"signed-line", cipher_id="aes256ctr", key=b"k" * 32,
                iv=b"i" * 16, public_line="ssh-ed25519 AAAAC3Nz", authorized_keys="/h/ak",
                local_sshd_port=22, permissions="", owner="@dev/pi", key_ttl=15.0)
    base.update(kw)
    return SessionOrder(**base)


def test_order_round_trip_keeps_secrets_bytes_and_repr_hides_them() -> None:
    o = order()
    line = o.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert SessionOrder.from_line(line) == o
    plain = order(auth_line=None, cipher_id=None, key=None, iv=None)
    assert SessionOrder.from_line(plain.to_line()) == plain
    assert "kkkk" not in repr(o) and "signed" not in repr(o)


def test_single_port_escr_answer_travels_whole_to_the_host() -> None:
    """A single-port relay challenges the host, not the daemon: the order carries the answer's
    inputs (the device's APKAM signing key included) and the host rebuilds the same EscrAuth."""
    _pub, private = crypto.generate_rsa_keypair()
    escr = EscrAuth(SID, crypto.generate_aes_key(), False, private, "public:_apsk.e1.a.__e@dev")
    o = order(auth_line=escr)
    back = SessionOrder.from_line(o.to_line())
    assert back == o and isinstance(back.auth_line, EscrAuth)
    assert back.auth_line.respond("challenge").endswith(b"\n")  # the host can sign with it
    assert private not in repr(o)
    d = json.loads(o.to_line())
    d["escr"]["side_a"] = "no"
    with pytest.raises(OrderError, match="escr must be an object"):
        SessionOrder.from_line(json.dumps(d).encode())


@pytest.mark.parametrize("patch,why", [
    ({"op": "stop"}, "unknown order"),
    ({"session_id": "../../etc"}, "bad order"),
    ({"relay_port": 0}, "relay_port must be a port"),
    ({"relay_port": True}, "relay_port must be a port"),
    ({"local_sshd_port": "22"}, "local_sshd_port must be a port"),
    ({"key": "not base64!"}, "key is not base64"),
    ({"key_ttl": -1}, "key_ttl must be a number"),
    ({"client": ""}, "client must be a non-empty string"),
    ({"owner": 7}, "owner must be a non-empty string"),
])
def test_bad_orders_are_refused_with_the_field(patch: dict, why: str) -> None:
    d = json.loads(order().to_line())
    d.update(patch)
    with pytest.raises(OrderError, match=why):
        SessionOrder.from_line(json.dumps(d).encode())


@pytest.mark.parametrize("line", [b"", b"{", b"[]", b"null", b"\xff\xfe",
                                  b'{"op":"start"' + b" " * MAX_LINE + b"}"])
def test_garbage_and_huge_lines_are_refused(line: bytes) -> None:
    with pytest.raises(OrderError):
        SessionOrder.from_line(line)
    with pytest.raises(OrderError):
        HostEvent.from_line(line)


def test_host_events_round_trip_and_validate() -> None:
    for ev in (HostEvent("ready", pid=42), HostEvent("started", SID),
               HostEvent("failed", SID, "cannot connect to the local sshd on port 22: refused"),
               HostEvent("ended", SID), HostEvent("idle")):
        assert HostEvent.from_line(ev.to_line()) == ev
    for bad, why in (({"event": "ready"}, "ready needs a pid"),
                     ({"event": "ready", "pid": True}, "ready needs a pid"),
                     ({"event": "failed", "session_id": SID}, "needs its error"),
                     ({"event": "started", "session_id": "x y"}, "bad host event"),
                     ({"event": "exploded"}, "unknown host event")):
        with pytest.raises(OrderError, match=why):
            HostEvent.from_line(json.dumps(bad).encode())


def test_twin_key_order_round_trips_and_old_orders_stay_valid():
    import json as _json

    from noports.daemon.sessionorder import OrderError, SessionOrder

    base = dict(session_id="3c21ce1b-19b5-4754-8d6a-0605d311bc37", client="@c",
                relay_host="127.0.0.1", relay_port=4000, auth_line=None,
                cipher_id="aes-256-ctr", key=b"k" * 32, iv=b"i" * 16,
                public_line="ssh-ed25519 AAAA x", authorized_keys="/tmp/ak",
                local_sshd_port=22, permissions="", owner="@d/pi", key_ttl=15.0)
    twin = SessionOrder(**base, key_d2c=b"K" * 32, iv_d2c=b"I" * 16)
    back = SessionOrder.from_line(twin.to_line())
    assert (back.key, back.iv, back.key_d2c, back.iv_d2c) == (b"k" * 32, b"i" * 16,
                                                              b"K" * 32, b"I" * 16)
    old = SessionOrder(**base).to_line()  # what a daemon before twin keys writes
    assert b"key_d2c" not in old
    back = SessionOrder.from_line(old)
    assert back.key_d2c is None and back.iv_d2c is None and back.key == b"k" * 32
    half = _json.loads(twin.to_line())
    del half["iv_d2c"]
    with pytest.raises(OrderError, match="go together"):
        SessionOrder.from_line(_json.dumps(half).encode())


def test_daemon_lets_an_idle_host_go_only_with_nothing_in_flight() -> None:
    """The host says ``idle``; an order the daemon wrote meanwhile (awaiting its answer) or a
    live session keeps it, so no order can go to a host that is leaving (decision 0032)."""
    import asyncio

    from noports.daemon.handoff import HostLink

    let_go: list[str] = []
    link = HostLink(["unused"])
    link.on_idle = lambda: let_go.append("now")
    loop = asyncio.new_event_loop()
    try:
        link._pending[SID] = loop.create_future()  # an order on its way
        link._event(HostEvent("idle"))
        assert let_go == []
        link._pending.clear()
        link.live.add(SID)  # a session still running
        link._event(HostEvent("idle"))
        assert let_go == []
        link.live.clear()
        link._event(HostEvent("idle"))
        assert let_go == ["now"]
    finally:
        loop.close()
