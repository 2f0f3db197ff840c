"""Pure srvd request handling: who may open a session, and what the reply looks like."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.npproto import RelayResponse
from noports.npproto.keys import legacy_relay_request_key, relay_request_key, relay_response_key
from noports.relay.srvd import (
    Accept,
    Refuse,
    SrvdPolicy,
    decide,
    parse_allow_list,
    reply_key_name,
    reply_text,
    validate_advertise,
)

SID = "a4b8a23e-b39f-4aa7-9991-ec7923a37192"
CN = "2024-01-27T08:48:00.911746"
R = "@relay"
KEY = relay_request_key(R, "orac", "@client")
OPEN = SrvdPolicy(R)
CLOSED = SrvdPolicy(R, frozenset({"@client"}))


def m1(**over: object) -> str:
    d: dict[str, object] = {"sessionId": SID, "atSignA": "@client", "atSignB": "@device",
                            "authenticateSocketA": True, "authenticateSocketB": True,
                            "clientNonce": CN}
    d.update(over)
    return json.dumps({k: v for k, v in d.items() if v is not ...})


def test_accepts_official_m1_from_allowed_sender() -> None:
    d = decide(KEY, "@client", m1(), CLOSED)
    assert d == Accept(SID, "@client", "orac", "@client", "@device", CN, True, True)


def test_open_relay_accepts_anyone_and_atsigns_are_case_insensitive() -> None:
    key = relay_request_key(R, "orac", "@Someone")
    d = decide(key.replace("@someone", "@SomeOne"), "SomeOne", m1(atSignA="@someONE"), OPEN)
    assert isinstance(d, Accept) and d.sender == d.atsign_a == "@someone"


def test_sender_not_in_allow_list_is_refused_even_if_atsign_a_is() -> None:
    key = relay_request_key(R, "orac", "@mallory")
    d = decide(key, "@mallory", m1(), CLOSED)  # atSignA says @client, sender is @mallory
    assert isinstance(d, Refuse) and "not allowed" in d.reason


def test_atsign_a_must_be_the_sender() -> None:
    policy = SrvdPolicy(R, frozenset({"@client", "@mallory"}))
    key = relay_request_key(R, "orac", "@mallory")
    d = decide(key, "@mallory", m1(), policy)
    assert isinstance(d, Refuse) and "atSignA" in d.reason


def test_key_sender_must_match_notification_sender() -> None:
    d = decide(relay_request_key(R, "orac", "@other"), "@client", m1(), OPEN)
    assert isinstance(d, Refuse) and "notification is from" in d.reason


def test_request_to_another_relay_is_refused() -> None:
    d = decide(relay_request_key("@elsewhere", "orac", "@client"), "@client", m1(), OPEN)
    assert isinstance(d, Refuse) and "addressed to" in d.reason


@pytest.mark.parametrize("value", [
    None, "", "not json", "[]", "null", "{}", m1(sessionId=...), m1(sessionId="NOT-A-UUID"),
    m1(sessionId=SID.upper()), m1(atSignA=...), m1(atSignB=7), m1(clientNonce=...),
    m1(clientNonce=""), m1(clientNonce="x" * 300), m1(authenticateSocketA="yes"),
    m1(authenticateSocketA=...), m1(atSignB="not an atsign"), "x" * 10_000, '{"a":' * 5000,
    "\x00\xff", m1(sessionId=1.5),
])
def test_malformed_values_are_refused_never_raise(value: str | None) -> None:
    assert isinstance(decide(KEY, "@client", value, OPEN), Refuse)


@pytest.mark.parametrize("key", [
    "", "garbage", "@relay:orac.sshnp@client", "@relay:orac.request_ports.sshrvd",
    "@relay:BAD NAME.request_ports.sshrvd@client", "@relay:.request_ports.sshrvd@client",
    "@relay:" + "a" * 100 + ".request_ports.sshrvd@client",
])
def test_bad_keys_are_refused(key: str) -> None:
    assert isinstance(decide(key, "@client", m1(), OPEN), Refuse)


@pytest.mark.parametrize("sender", ["", "@", "a b", "@a:b"])
def test_bad_senders_are_refused(sender: str) -> None:
    assert isinstance(decide(KEY, sender, m1(), OPEN), Refuse)


def test_duplicate_session_id_is_refused() -> None:
    d = decide(KEY, "@client", m1(), OPEN, known_sessions={SID})
    assert isinstance(d, Refuse) and "duplicate" in d.reason


def test_per_sender_session_cap() -> None:
    policy = SrvdPolicy(R, max_sessions_per_sender=2)
    assert isinstance(decide(KEY, "@client", m1(), policy, sender_sessions=1), Accept)
    assert isinstance(decide(KEY, "@client", m1(), policy, sender_sessions=2), Refuse)


def test_missing_authenticate_socket_b_means_false() -> None:
    d = decide(KEY, "@client", m1(authenticateSocketB=...), OPEN)
    assert isinstance(d, Accept) and d.auth_a and not d.auth_b


def test_require_socket_auth() -> None:
    policy = SrvdPolicy(R, require_socket_auth=True)
    assert isinstance(decide(KEY, "@client", m1(authenticateSocketB=False), policy), Refuse)
    assert isinstance(decide(KEY, "@client", m1(), policy), Accept)


def test_legacy_request() -> None:
    key = legacy_relay_request_key(R, "orac", "@client")
    d = decide(key, "@client", SID + "\n", OPEN)
    assert d == Accept(SID, "@client", "orac", "@client", None, None, False, False, legacy=True)
    assert isinstance(decide(key, "@client", SID, SrvdPolicy(R, allow_legacy=False)), Refuse)
    assert isinstance(decide(key, "@client", SID, SrvdPolicy(R, require_socket_auth=True)),
                      Refuse)
    assert isinstance(decide(key, "@client", "nope", OPEN), Refuse)
    assert isinstance(decide(key, "@mallory", SID, CLOSED), Refuse)


def test_unknown_fields_are_tolerated() -> None:
    assert isinstance(decide(KEY, "@client", m1(newerField=[1, 2]), OPEN), Accept)


def test_reply_text_and_key_exactly_as_reference() -> None:
    assert reply_text("10.0.0.2", 40001, 40002, CN) == f"10.0.0.2,40001,40002,{CN}"
    assert reply_text("relay.example", 1, 2, None) == "relay.example,1,2,null"
    parsed = RelayResponse.from_csv(reply_text("10.0.0.2", 40001, 40002, CN))
    assert (parsed.host, parsed.port_a, parsed.port_b, parsed.rvd_nonce) == (
        "10.0.0.2", 40001, 40002, CN)
    assert f"@client:{reply_key_name(SID)}@relay" == relay_response_key("@client", SID, R)


@pytest.mark.parametrize("bad", ["", "a,b", "a b", "x\n"])
def test_advertised_address_must_fit_the_csv(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_advertise(bad)


def test_allow_list_file_format() -> None:
    text = "# team\n@Alice\nbob, @carol  # trailing comment\n\n"
    assert parse_allow_list(text) == frozenset({"@alice", "@bob", "@carol"})
    assert SrvdPolicy(R, frozenset({"Alice"})).allowed == frozenset({"@alice"})

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=6),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(key=st.one_of(st.just(KEY), st.text(max_size=80)), sender=st.text(max_size=20),
       value=st.one_of(st.none(), st.text(max_size=300),
                       _json_values.map(lambda v: json.dumps(v)),
                       st.dictionaries(st.sampled_from(["sessionId", "atSignA", "atSignB",
                                                        "authenticateSocketA",
                                                        "authenticateSocketB", "clientNonce"]),
                                       _json_values).map(json.dumps)))
def test_decide_never_raises(key: str, sender: str, value: str | None) -> None:
    assert isinstance(decide(key, sender, value, OPEN), (Accept, Refuse))


def test_who_is_told_and_who_is_not() -> None:
    """Issue 9: refusals of a served sender carry a NACK naming the limit and its flag;
    strangers, spoofed keys, unreadable values and duplicates get nothing."""
    cap = decide(KEY, "@client", m1(), SrvdPolicy(R, max_sessions_per_sender=64),
                 sender_sessions=64)
    assert cap == Refuse("@client already has 64 sessions (max 64; srvd "
                         "--max-sessions-per-atsign)", SID,
                         "@client already has 64 sessions (max 64; srvd "
                         "--max-sessions-per-atsign)")
    strict = SrvdPolicy(R, require_socket_auth=True)
    d = decide(KEY, "@client", m1(authenticateSocketA=False), strict)
    assert isinstance(d, Refuse) and d.session_id == SID and d.nack is not None
    assert "srvd --require-socket-auth" in d.nack
    legacy = decide(legacy_relay_request_key(R, "orac", "@client"), "@client", SID,
                    SrvdPolicy(R, allow_legacy=False))
    assert isinstance(legacy, Refuse) and legacy.nack is not None
    assert "srvd --no-legacy" in legacy.nack
    silent = [
        decide(KEY, "@mallory", m1(), CLOSED),  # not allowed
        decide(relay_request_key(R, "orac", "@device"), "@client", m1(), OPEN),  # spoofed
        decide(relay_request_key("@other", "orac", "@client"), "@client", m1(), OPEN),
        decide(KEY, "@client", None, OPEN),  # undecryptable
        decide(KEY, "@client", "{", OPEN),  # no session id to answer to
        decide(KEY, "@client", m1(), OPEN, known_sessions={SID}),  # re-delivered
    ]
    assert all(isinstance(d, Refuse) and d.nack is None for d in silent), silent
