"""Relay choice among several -r relays, and the single-port request fields (no sockets)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from noports.client import relays
from noports.client.params import SessionParams
from noports.client.relays import Probe, rank
from noports.keys.atkeys import AtKeys
from noports.npproto import escr

A, B, C = "@rv_a", "@rv_b", "@rv_c"


def test_fastest_first_unmeasured_last_in_given_order() -> None:
    probes = [Probe(A, 0.300, "answer"), Probe(B, None, "no answer"), Probe(C, 0.020, "answer")]
    assert rank([A, B, C], probes) == [C, A, B]
    assert rank([B, A, C], [Probe(A, None, "x"), Probe(B, None, "x")]) == [B, A, C]


def test_ties_keep_the_order_given() -> None:
    assert rank([B, A], [Probe(A, 0.1, "answer"), Probe(B, 0.1, "answer")]) == [B, A]


def test_describe_names_each_measure() -> None:
    text = relays.describe([Probe(A, 0.0021, "connect 10.0.0.2:443"),
                            Probe(B, None, "no answer within 5s")])
    assert text == "@rv_a 2 ms (connect 10.0.0.2:443), @rv_b no answer within 5s"


@pytest.mark.parametrize(("value", "want"), [
    ('{"ipaddr":"10.0.0.2","port":443}', ("10.0.0.2", 443)),
    ('{"ip":"relay.example","port":0}', ("relay.example", 0)),
])
def test_parse_discover(value: str, want: tuple[str, int]) -> None:
    assert relays.parse_discover(value) == want


@pytest.mark.parametrize("value", ['[]', '{"port":443}', '{"ipaddr":"h","port":70000}',
                                   '{"ipaddr":"h","port":"443"}'])
def test_parse_discover_refuses_junk(value: str) -> None:
    with pytest.raises(ValueError):
        relays.parse_discover(value)


def test_probe_times_answers_and_survives_silence_and_errors() -> None:
    delays = {A: 0.30, C: 0.01}

    async def ask(relay: str) -> str:
        if relay == B:
            await asyncio.sleep(10)  # never answers in time
        if relay == "@gone":
            raise LookupError("not in the directory")
        await asyncio.sleep(delays[relay])
        return json.dumps({"ipaddr": "x", "port": 0})

    probes = asyncio.run(relays.probe_all([A, B, C, "@gone"], ask, timeout=0.6, grace=1.0))
    by = {p.relay: p for p in probes}
    assert by[B].seconds is None and "no answer within 0.6s" in by[B].how
    assert by["@gone"].seconds is None and "LookupError" in by["@gone"].how
    assert by[C].seconds is not None and by[A].seconds is not None
    assert rank([A, B, C, "@gone"], probes) == [C, A, B, "@gone"]


def test_waiting_ends_soon_after_the_first_answer() -> None:
    async def ask(relay: str) -> str:
        await asyncio.sleep({A: 0.01, B: 30.0}[relay])  # B: an srvd that never answers
        return json.dumps({"ipaddr": "x", "port": 0})

    probes = asyncio.run(relays.probe_all([B, A], ask, timeout=5.0, grace=0.2))
    # cut off after the grace, not "no answer within 5s" at the probe time
    assert probes[0] == Probe(B, None, "slower than the fastest")
    assert rank([B, A], probes) == [A, B]


def _params(**kw: object) -> SessionParams:
    return SessionParams(client_atsign="@c", device_atsign="@d", relays=[A], **kw)


def test_escr_fields_only_when_asked(tmp_path: Path) -> None:
    keys = AtKeys("@c", "pub", "priv", "epub", "epriv", "self", enrollment_id="e1")
    assert relays.escr_key_for(_params()) is None
    assert relays.request_extra(_params(), None, keys) == {}
    assert relays.session_request_extra(None) == {}
    p = _params(only443=True)
    key = relays.escr_key_for(p)
    assert key is not None and escr.valid_relay_auth_key(key)
    extra = relays.request_extra(p, key, keys)
    assert extra == {"relayAuthMode": "escr", "relayAuthAesKey": key, "only443": True,
                     "multipleAcksOk": True, "preFetch": ["public:_apsk.e1.a.__e@c"],
                     "sendJsonResponse": True}
    assert relays.session_request_extra(key) == {"relayAuthMode": "escr",
                                                 "relayAuthAesKey": key}


def test_bad_choices_are_usage_errors() -> None:
    from noports.client.errors import UsageError
    with pytest.raises(UsageError, match="--relay-select"):
        _params(relay_select="random")
    with pytest.raises(UsageError, match="--relay-auth-mode"):
        _params(relay_auth_mode="pq")
