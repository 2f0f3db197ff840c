"""Sans-IO atDirectory session: framing, normalisation, limits and the miss policy."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.directory.protocol import (
    NULL_REPLY,
    Close,
    DirectorySession,
    Lookup,
    MissLimiter,
    MissPolicy,
    Write,
    normalise_lookup,
    reply_for,
)

REGISTRY = {"alice🛠": "vip.ve.atsign.zone:25000", "bob": "127.0.0.1:6464"}


class FakeClock:
    """Manually advanced monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def no_delay_limiter() -> MissLimiter:
    return MissLimiter(MissPolicy(max_delay=0.0, base_delay=0.0))


def drive(session: DirectorySession, data: bytes, registry: dict[str, str] | None = None
          ) -> list[Write | Close]:
    """Run the session like the server does, resolving lookups from `registry`."""
    registry = REGISTRY if registry is None else registry
    out: list[Write | Close] = []
    queue = session.receive(data)
    while queue:
        action = queue.pop(0)
        if isinstance(action, Lookup):
            queue = session.resolved(registry.get(action.atsign)) + queue
        else:
            out.append(action)
    return out


def wire(actions: list[Write | Close]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Write))


def test_prompt_on_connect_is_a_bare_at() -> None:
    assert DirectorySession(no_delay_limiter()).start() == [Write(b"@")]


def test_hit_reply_is_one_write_with_crlf_and_prompt() -> None:
    s = DirectorySession(no_delay_limiter())
    assert drive(s, "alice🛠\n".encode()) == [Write(b"vip.ve.atsign.zone:25000\r\n@")]


def test_miss_reply_is_null_crlf_prompt() -> None:
    s = DirectorySession(no_delay_limiter())
    assert drive(s, b"nosuchatsign\n") == [Write(NULL_REPLY)]
    assert NULL_REPLY == b"null\r\n@"


@pytest.mark.parametrize("line", [b"ALICE\xf0\x9f\x9b\xa0\n", b"@alice\xf0\x9f\x9b\xa0\n",
                                  b"alice\xf0\x9f\x9b\xa0\r\n", b"  Alice\xf0\x9f\x9b\xa0 \r\n"])
def test_lowercase_crlf_and_leading_at_are_tolerated(line: bytes) -> None:
    s = DirectorySession(no_delay_limiter())
    assert s.receive(line) == [Lookup("alice🛠")]


def test_split_reads_including_inside_a_utf8_sequence() -> None:
    s = DirectorySession(no_delay_limiter())
    data = "alice🛠\n".encode()
    for i in range(len(data) - 1):
        assert s.receive(data[i:i + 1]) == []
    assert s.receive(data[-1:]) == [Lookup("alice🛠")]
    assert s.awaiting_lookup
    assert s.resolved("h:1") == [Write(b"h:1\r\n@")]


def test_pipelined_lines_are_answered_in_order_one_lookup_at_a_time() -> None:
    s = DirectorySession(no_delay_limiter())
    first = s.receive(b"bob\nalice\xf0\x9f\x9b\xa0\nnobody\n")
    assert first == [Lookup("bob")]
    second = s.resolved("127.0.0.1:6464")
    assert second == [Write(b"127.0.0.1:6464\r\n@"), Lookup("alice🛠")]
    third = s.resolved("vip.ve.atsign.zone:25000")
    assert third[1] == Lookup("nobody")
    assert s.resolved(None) == [Write(NULL_REPLY)]


def test_exit_closes_without_reply_and_ignores_later_data() -> None:
    s = DirectorySession(no_delay_limiter())
    assert drive(s, b"bob\n@EXIT\r\nalice\n") == [Write(b"127.0.0.1:6464\r\n@"), Close("@exit")]
    assert s.closed
    assert s.receive(b"bob\n") == []


OVERLONG = b"error:request line longer than 255 bytes: limit --max-line-bytes 255\r\n@"


def test_line_of_255_bytes_is_accepted_and_256_answers_the_limit_then_closes() -> None:
    ok = DirectorySession(no_delay_limiter())
    assert ok.receive(b"a" * 254 + b"\n") == [Lookup("a" * 254)]
    too_long = DirectorySession(no_delay_limiter())
    actions = too_long.receive(b"a" * 255 + b"\n")
    assert actions == [Write(OVERLONG), Close(OVERLONG[6:-3].decode())]
    assert too_long.closed
    # 254 characters and CRLF are 256 bytes: over the limit too, and the peer is told so.
    crlf = DirectorySession(no_delay_limiter())
    assert wire(crlf.receive(b"a" * 254 + b"\r\n")) == OVERLONG


def test_unterminated_overflow_answers_before_newline_arrives() -> None:
    s = DirectorySession(no_delay_limiter())
    assert s.receive(b"x" * 200) == []
    actions = s.receive(b"x" * 55)
    assert actions[0] == Write(OVERLONG) and isinstance(actions[1], Close)


def test_line_limit_is_configurable_and_named() -> None:
    s = DirectorySession(no_delay_limiter(), max_line_bytes=10, line_limit_name="--x")
    assert wire(s.receive(b"a" * 10 + b"\n")) == \
        b"error:request line longer than 10 bytes: limit --x 10\r\n@"


def test_too_many_pipelined_requests_answer_the_limit_then_close() -> None:
    s = DirectorySession(no_delay_limiter(), max_pending_bytes=100)
    actions = s.receive(b"abc\n" * 40)
    assert isinstance(actions[-1], Close)
    assert actions[-2] == Write(b"error:too many pipelined requests: "
                                b"limit --max-pending-bytes 100 bytes\r\n@")


def test_expecting_line_drives_the_request_deadline() -> None:
    s = DirectorySession(no_delay_limiter())
    assert s.expecting_line  # nothing asked yet
    drive(s, b"bob\n")
    assert not s.expecting_line  # answered, idle
    s.receive(b"al")
    assert s.expecting_line  # inside a partial line
    assert s.expire("no complete request line within 10 s") == [
        Write(b"error:no complete request line within 10 s\r\n@"),
        Close("no complete request line within 10 s")]
    assert s.closed and not s.expecting_line and s.expire("again") == []


@pytest.mark.parametrize("garbage", [b"\xff\xfe\n", b"a b\n", b"x:y\n", b"a@b\n", b"@\n"])
def test_garbage_lines_are_answered_null_without_a_store_lookup(garbage: bytes) -> None:
    s = DirectorySession(no_delay_limiter())
    assert s.receive(garbage) == [Write(NULL_REPLY)]
    assert s.misses == 1
    assert not s.closed


def test_empty_line_answers_null_and_is_not_a_miss() -> None:
    s = DirectorySession(no_delay_limiter())
    assert s.receive(b"\r\n") == [Write(NULL_REPLY)]
    assert s.misses == 0


def test_store_failure_closes_instead_of_claiming_null() -> None:
    s = DirectorySession(no_delay_limiter())
    assert s.receive(b"bob\n") == [Lookup("bob")]
    actions = s.failed("redis down")
    assert len(actions) == 1 and isinstance(actions[0], Close) and s.closed


def test_eof_closes() -> None:
    s = DirectorySession(no_delay_limiter())
    assert isinstance(s.eof()[0], Close)


def test_resolved_without_lookup_is_a_bug() -> None:
    with pytest.raises(RuntimeError):
        DirectorySession(no_delay_limiter()).resolved(None)


def test_reply_for() -> None:
    assert reply_for(None) == b"null\r\n@"
    assert reply_for("h:1") == b"h:1\r\n@"


@given(st.binary(max_size=600), st.lists(st.integers(1, 50), max_size=30))
@settings(max_examples=200, deadline=None)
def test_any_bytes_any_split_never_crash_and_replies_are_well_formed(data: bytes,
                                                                     cuts: list[int]) -> None:
    s = DirectorySession(no_delay_limiter())
    pos = 0
    outs: list[Write | Close] = []
    for cut in [*cuts, len(data)]:
        outs += drive(s, data[pos:pos + cut], {})
        pos += cut
        if s.closed:
            break
    for i, a in enumerate(outs):
        if isinstance(a, Write):
            # null replies, or one error line followed by the close
            assert a.data == NULL_REPLY or (
                a.data.startswith(b"error:") and a.data.endswith(b"\r\n@")
                and isinstance(outs[i + 1], Close))


@given(st.text(min_size=1, max_size=40))
def test_normalise_lookup_matches_lower_strip(text: str) -> None:
    key = normalise_lookup(text)
    if key is not None:
        assert key == key.lower().strip()
        assert ":" not in key and "@" not in key and not any(c.isspace() for c in key)


# --------------------------------------------------------------------------- miss policy


def misses(session: DirectorySession, n: int) -> list[float]:
    delays = []
    for i in range(n):
        (action,) = drive(session, f"nobody{i}\n".encode(), {})
        assert isinstance(action, Write) and action.data == NULL_REPLY
        delays.append(action.delay)
    return delays


def test_first_misses_are_free_then_delays_grow_to_the_cap_and_never_close() -> None:
    clock = FakeClock()
    policy = MissPolicy(conn_burst=3, conn_refill_per_s=0, ip_burst=1000, ip_refill_per_s=0,
                        base_delay=0.5, max_delay=3.0)
    s = DirectorySession(MissLimiter(policy, clock), peer="10.0.0.1")
    delays = misses(s, 10)
    assert delays[:3] == [0.0, 0.0, 0.0]
    assert delays[3:7] == [0.5, 1.0, 2.0, 3.0]
    assert delays[7:] == [3.0, 3.0, 3.0]
    assert not s.closed


def test_hits_are_never_delayed_even_after_many_misses() -> None:
    clock = FakeClock()
    s = DirectorySession(MissLimiter(MissPolicy(conn_burst=1, conn_refill_per_s=0), clock))
    misses(s, 20)
    assert drive(s, b"bob\n") == [Write(b"127.0.0.1:6464\r\n@")]


def test_bucket_refills_so_a_quiet_client_gets_free_misses_again() -> None:
    clock = FakeClock()
    policy = MissPolicy(conn_burst=2, conn_refill_per_s=0.5, ip_burst=1000,
                        base_delay=1.0, max_delay=4.0)
    s = DirectorySession(MissLimiter(policy, clock), peer="10.0.0.1")
    assert misses(s, 6) == [0.0, 0.0, 1.0, 2.0, 4.0, 4.0]
    clock.advance(60)  # full refill, debt included (debt is floored at the cap)
    assert misses(s, 3) == [0.0, 0.0, 1.0]


def test_debt_is_floored_so_recovery_time_is_bounded() -> None:
    clock = FakeClock()
    policy = MissPolicy(conn_burst=1, conn_refill_per_s=1.0, ip_burst=1000,
                        base_delay=1.0, max_delay=4.0)
    s = DirectorySession(MissLimiter(policy, clock))
    misses(s, 1000)  # a long burst must not leave a huge debt behind
    clock.advance(policy.max_useful_deficit() + policy.conn_burst)
    assert misses(s, 1) == [0.0]


def test_per_ip_bucket_is_shared_across_connections() -> None:
    clock = FakeClock()
    policy = MissPolicy(conn_burst=100, ip_burst=4, ip_refill_per_s=0,
                        base_delay=0.25, max_delay=3.0)
    limiter = MissLimiter(policy, clock)
    delays = []
    for _ in range(6):  # Dart style: a new connection per lookup
        delays += misses(DirectorySession(limiter, peer="192.0.2.7"), 1)
    assert delays == [0.0, 0.0, 0.0, 0.0, 0.25, 0.5]
    # another IP is unaffected
    assert misses(DirectorySession(limiter, peer="192.0.2.8"), 1) == [0.0]


def test_limiter_prunes_refilled_peers() -> None:
    clock = FakeClock()
    limiter = MissLimiter(MissPolicy(ip_burst=2, ip_refill_per_s=1.0), clock)
    for i in range(50):
        misses(DirectorySession(limiter, peer=f"10.0.0.{i}"), 1)
    assert limiter.tracked_peers() == 50
    clock.advance(5)
    limiter.prune()
    assert limiter.tracked_peers() == 0


def test_zero_max_delay_disables_delays() -> None:
    s = DirectorySession(MissLimiter(MissPolicy(conn_burst=0, ip_burst=0, base_delay=0,
                                                max_delay=0), FakeClock()))
    assert set(misses(s, 10)) == {0.0}


@pytest.mark.parametrize("kwargs", [{"conn_burst": -1}, {"max_delay": float("nan")},
                                    {"base_delay": 5, "max_delay": 1},
                                    {"ip_refill_per_s": float("inf")}])
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MissPolicy(**kwargs)


# --------------------------------------------------------------------------- properties (receive)

_PIECES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"alice\xf0\x9f\x9b\xa0\n", b"BOB\r\n", b"@exit\n", b"\n", b"\r\n",
                     b"nobody\n", b"a" * 254 + b"\n", b"a" * 300, b"x:y\n", b"\xff\n"]),
)


@given(st.lists(_PIECES, max_size=12))
@settings(derandomize=True, max_examples=300, deadline=None)
def test_receive_never_raises_and_every_line_gets_one_reply_or_the_close(
        chunks: list[bytes]) -> None:
    """Any bytes, any split: one reply per complete line; a close is last and, unless the
    peer asked for it (@exit), comes right after an ``error:`` line that names the limit."""
    s = DirectorySession(no_delay_limiter(), max_pending_bytes=2048)
    actions: list[Write | Close] = []
    fed = b""
    for chunk in chunks:
        actions += drive(s, chunk)
        fed += chunk
        if s.closed:
            break
    writes = [a for a in actions if isinstance(a, Write)]
    closes = [a for a in actions if isinstance(a, Close)]
    if not s.closed:
        assert not closes
        assert len(writes) == fed.count(b"\n")
        assert all(w.data.endswith(b"\r\n@") for w in writes)
    else:
        assert closes == [actions[-1]]
        if closes[0].reason != "@exit":
            assert writes and writes[-1] == actions[-2]
            assert writes[-1].data.startswith(b"error:") and b"limit --" in writes[-1].data
        assert s.receive(b"bob\n") == []
