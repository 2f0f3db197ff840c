"""Pairing and lifetime rules of the relay session state machine, with a fake clock."""

from __future__ import annotations

import pytest

from noports.relay.session import (
    AuthLineReader,
    AuthLineTooLong,
    CloseSession,
    Drop,
    Pair,
    RelaySession,
    SessionPolicy,
    Side,
)

POLICY = SessionPolicy(auth_timeout=5.0, unpaired_timeout=30.0, max_pending_per_side=4)


def make(now: float = 100.0, policy: SessionPolicy = POLICY) -> RelaySession:
    return RelaySession("sid", policy, now)


def authed(s: RelaySession, side: Side, cid: int, now: float = 100.0) -> list:
    assert s.accept(side, cid, now) == []
    return s.auth_result(cid, True, now)


def test_fifo_pairing_in_arrival_order() -> None:
    s = make()
    assert authed(s, Side.A, 1) == []
    assert authed(s, Side.A, 2) == []
    assert authed(s, Side.A, 3) == []
    assert authed(s, Side.B, 10) == [Pair(1, 10)]
    assert authed(s, Side.B, 11) == [Pair(2, 11)]
    assert s.pending(Side.A) == [3]
    assert authed(s, Side.B, 12) == [Pair(3, 12)]
    assert s.active_pairs == 3 and s.pairs_total == 3


def test_pairing_order_follows_authentication_not_connection() -> None:
    s = make()
    s.accept(Side.A, 1, 100.0)
    s.accept(Side.A, 2, 100.0)
    assert s.auth_result(2, True, 101.0) == []  # 2 authenticates first
    assert s.auth_result(1, True, 102.0) == []
    assert authed(s, Side.B, 9) == [Pair(2, 9)]


def test_failed_auth_is_dropped_and_never_paired() -> None:
    s = make()
    s.accept(Side.A, 1, 100.0)
    actions = s.auth_result(1, False, 100.5, "bad signature")
    assert actions == [Drop(1, "bad signature")]
    assert authed(s, Side.B, 2) == []
    assert s.pending(Side.A) == [] and s.pending(Side.B) == [2]


def test_auth_timeout_drops_only_expired_sockets() -> None:
    s = make()
    s.accept(Side.A, 1, 100.0)
    s.accept(Side.B, 2, 103.0)
    assert s.next_deadline() == 105.0
    assert s.tick(104.9) == []
    acts = s.tick(105.0)
    assert len(acts) == 1 and isinstance(acts[0], Drop) and acts[0].conn == 1
    assert "did not authenticate within 5s" in acts[0].reason
    assert s.authenticating() == [2]
    assert s.next_deadline() == 108.0
    assert s.auth_result(1, True, 105.1) == []  # late result for a dropped socket: ignored


def test_unpaired_session_closes_after_grace() -> None:
    s = make()
    authed(s, Side.A, 1)
    assert s.next_deadline() == 130.0
    assert s.tick(129.0) == []
    acts = s.tick(130.0)
    assert Drop(1, "session closed") in acts
    assert isinstance(acts[-1], CloseSession) and "never paired" in acts[-1].reason
    assert s.closed and s.next_deadline() is None
    assert s.accept(Side.B, 5, 131.0) == [Drop(5, "session closed")]


def test_paired_session_survives_grace_and_closes_with_last_pair() -> None:
    s = make()
    authed(s, Side.A, 1)
    authed(s, Side.B, 2)
    authed(s, Side.A, 3)
    authed(s, Side.B, 4)
    assert s.tick(130.0) == [] and s.grace_over and not s.closed
    assert s.conn_closed(1, 140.0) == [Drop(2, "peer closed")]
    assert not s.closed
    acts = s.conn_closed(4, 150.0)
    assert acts[0] == Drop(3, "peer closed")
    assert isinstance(acts[-1], CloseSession) and acts[-1].reason == "last connection closed"


def test_pairs_may_come_and_go_during_grace() -> None:
    s = make()
    authed(s, Side.A, 1)
    authed(s, Side.B, 2)
    s.conn_closed(2, 110.0)
    assert not s.closed  # still within the 30 s grace: npt may open the next one
    authed(s, Side.A, 3, 111.0)
    assert authed(s, Side.B, 4, 112.0) == [Pair(3, 4)]
    s.conn_closed(3, 120.0)
    acts = s.tick(130.0)
    assert isinstance(acts[-1], CloseSession) and "no active connection" in acts[-1].reason


def test_closing_one_side_closes_its_peer_once() -> None:
    s = make()
    authed(s, Side.A, 1)
    authed(s, Side.B, 2)
    assert s.peer_of(1) == 2
    assert s.conn_closed(2, 101.0) == [Drop(1, "peer closed")]
    assert s.conn_closed(1, 101.0) == []


def test_pending_side_closing_leaves_queue() -> None:
    s = make()
    authed(s, Side.A, 1)
    authed(s, Side.A, 2)
    assert s.conn_closed(1, 101.0) == []
    assert authed(s, Side.B, 3) == [Pair(2, 3)]


def test_unauthenticated_sockets_never_take_a_real_partys_place() -> None:
    """Issue 9: squatters on a freshly scanned port (more than max_pending_per_side of them)
    must not stop the real parties from pairing."""
    s = make()  # max_pending_per_side=4
    squatters = list(range(100, 116))  # 16 idle sockets on each side
    for cid in squatters:
        assert s.accept(Side.A, cid, 100.0) == []
        assert s.accept(Side.B, cid + 100, 100.0) == []
    assert s.accept(Side.A, 1, 100.5) == []  # the client, after them
    assert s.auth_result(1, True, 100.5) == []
    assert s.accept(Side.B, 2, 100.6) == []  # the device
    assert s.auth_result(2, True, 100.6) == [Pair(1, 2)]
    # the squatters are still bounded by their own deadline
    acts = s.tick(105.0)
    assert {a.conn for a in acts} == set(squatters) | {c + 100 for c in squatters}
    assert all("did not authenticate within 5s" in a.reason for a in acts)


def test_unauthenticated_beyond_the_cap_evict_the_oldest() -> None:
    s = make(policy=SessionPolicy(max_unauth_per_side=3))
    for cid in (1, 2, 3):
        assert s.accept(Side.A, cid, 100.0 + cid) == []
    acts = s.accept(Side.A, 4, 105.0)
    assert [a.conn for a in acts] == [1] and "evicted" in acts[0].reason
    assert s.accept(Side.B, 50, 105.0) == []  # the other side has its own budget
    assert s.authenticating() == [2, 3, 4, 50]
    # a real party that authenticated is out of the unauthenticated budget for good
    assert s.auth_result(4, True, 105.1) == []
    for cid in (5, 6, 7):
        s.accept(Side.A, cid, 106.0)
    assert s.pending(Side.A) == [4]
    assert authed(s, Side.B, 60, 106.0) == [Pair(4, 60)]


def test_max_pending_per_side_counts_authenticated_only() -> None:
    s = make()  # max_pending_per_side=4
    for cid in range(4):
        authed(s, Side.A, cid)
    s.accept(Side.A, 99, 100.0)
    acts = s.auth_result(99, True, 100.0)
    assert len(acts) == 1 and acts[0].conn == 99 and "too many authenticated" in acts[0].reason
    assert s.pending(Side.A) == [0, 1, 2, 3]


def test_max_pairs() -> None:
    s = make(policy=SessionPolicy(max_pairs=1))
    authed(s, Side.A, 1)
    assert authed(s, Side.B, 2) == [Pair(1, 2)]
    authed(s, Side.A, 3)
    acts = authed(s, Side.B, 4)
    assert {a.conn for a in acts} == {3, 4} and all("too many active pairs" in a.reason
                                                     for a in acts)


def test_unauthenticated_sides_pair_immediately() -> None:
    s = make()
    assert s.accept(Side.A, 1, 100.0, needs_auth=False) == []
    assert s.accept(Side.B, 2, 100.0, needs_auth=False) == [Pair(1, 2)]


def test_external_close_drops_everything() -> None:
    s = make()
    authed(s, Side.A, 1)
    authed(s, Side.B, 2)
    s.accept(Side.A, 3, 100.0)
    acts = s.close("shutdown")
    assert {a.conn for a in acts if isinstance(a, Drop)} == {1, 2, 3}
    assert acts[-1] == CloseSession("shutdown")
    assert s.close("again") == []


def test_auth_line_reader() -> None:
    r = AuthLineReader(64)
    assert r.feed(b'{"payload":') is None
    assert r.feed(b'1}\nSSH-2.0') == (b'{"payload":1}', b"SSH-2.0")
    with pytest.raises(AuthLineTooLong):
        AuthLineReader(8).feed(b"x" * 8)
    with pytest.raises(AuthLineTooLong):
        AuthLineReader(8).feed(b"x" * 10 + b"\n")
    assert AuthLineReader(8).feed(b"1234567\n") == (b"1234567", b"")
