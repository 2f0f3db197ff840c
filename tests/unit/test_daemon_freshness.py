"""sshnpd freshness decisions without sockets: window, boundaries, zones, hostile nonces.

The clock is an argument of :func:`check_request_time` and of the handler, so every case is
exact; naive (zone-less) nonces are built with the same local-time conversion the daemon uses.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.daemon.cli import parse_args
from noports.daemon.config import ConfigError, build_config, parse_config_text
from noports.daemon.handler import (
    DaemonHandler,
    Fresh,
    Ignore,
    Inbound,
    Reply,
    Request,
    SessionPlan,
    check_request_time,
)
from noports.daemon.sshkeys import EphemeralKey
from noports.npproto import SshRequest, dart_iso, sign_envelope

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "npproto"
KEYS = json.loads((FIX / "test_keys.json").read_text())
CPUB, CPRIV = KEYS["client"]["publicKey"], KEYS["client"]["privateKey"]
DPRIV = KEYS["device"]["privateKey"]
SID = "0b7e6c1a-3c1f-4f7e-9d5a-2b8f0e6c9a11"
NOW = 1_780_000_000.0  # a fixed device clock (2026)


def utc(t: float) -> str:
    return dart_iso(datetime.fromtimestamp(t, timezone.utc))


def local(t: float) -> str:
    """What an official Dart client sends: local time, no zone."""
    return dart_iso(datetime.fromtimestamp(t))


# --- the pure check ----------------------------------------------------------------------------

@pytest.mark.parametrize("mk", [utc, local])
@pytest.mark.parametrize("delta", [0.0, -60.0, 60.0, -59.999, 59.999])
def test_inside_the_window_and_on_its_boundary(mk, delta):
    r = check_request_time(mk(NOW + delta), NOW, 60)
    assert isinstance(r, Fresh)
    assert r.skew == pytest.approx(delta, abs=1e-3)
    assert r.expires == pytest.approx(NOW + delta + 60, abs=1e-3)


@pytest.mark.parametrize("mk", [utc, local])
@pytest.mark.parametrize("delta,where", [(-60.001, "behind"), (60.001, "ahead of"),
                                         (-13 * 3600, "behind"), (3600, "ahead of")])
def test_outside_the_window_names_the_difference_and_what_to_check(mk, delta, where):
    r = check_request_time(mk(NOW + delta), NOW, 60)
    assert isinstance(r, str)
    assert f"{where} the device clock (allowed: 60 s either way)" in r
    assert "check that the client's and the device's clocks are synchronised (NTP)" in r
    if abs(delta) >= 3600:
        assert f"({int(abs(delta))} s)" in r and " h " in r
    else:
        assert "60.0 s" in r
    # a zone-less timestamp also points at time zones and the flag that tolerates them
    assert ("same time zone" in r and "--any-client-timezone" in r) == (mk is local)


def test_window_is_configurable():
    assert isinstance(check_request_time(utc(NOW - 5), NOW, 10), Fresh)
    assert isinstance(check_request_time(utc(NOW - 11), NOW, 10), str)
    assert isinstance(check_request_time(utc(NOW - 600), NOW, 900), Fresh)


def test_any_timezone_accepts_whole_zone_offsets_only_for_zoneless_nonces():
    for offset in (3600, -5 * 3600, 5.5 * 3600, 5.75 * 3600, 14 * 3600, -12 * 3600):
        r = check_request_time(local(NOW + offset + 30), NOW, 60, any_timezone=True)
        assert isinstance(r, Fresh), offset
        assert r.skew == pytest.approx(30, abs=1e-3)
        assert r.expires == pytest.approx(NOW + offset + 30 + 26 * 3600 + 60, abs=1e-3)
    # the window still bounds what is left once the offset is taken out
    r = check_request_time(local(NOW + 3600 + 120), NOW, 60, any_timezone=True)
    assert isinstance(r, str) and "--any-client-timezone" not in r
    # beyond any real zone (26 h): refused
    assert isinstance(check_request_time(local(NOW - 27 * 3600), NOW, 60, any_timezone=True),
                      str)
    # a UTC ("Z") nonce has a zone: no offset is tolerated
    assert isinstance(check_request_time(utc(NOW + 3600), NOW, 60, any_timezone=True), str)


@pytest.mark.parametrize("nonce", [None, 10 ** 400, -1, 1.5, math.nan, True, [], {},
                                   "NaN", "nan", "inf", "-Infinity", "", " ", "x" * 100_000,
                                   "2026-13-01T00:00:00.000", "0000-01-01T00:00:00.000",
                                   "9999-99-99T99:99:99.999", "2026-01-01 00:00:00",
                                   "2026-01-01T00:00:00.000+01:00", "１２３",
                                   "2026-01-01T00:00:00.000\n", "\x00"])
def test_hostile_nonces_are_refused_without_raising(nonce):
    r = check_request_time(nonce, NOW, 60)
    assert isinstance(r, str)
    assert len(r) < 400  # a huge nonce is not echoed back whole


def test_no_nonce_says_so():
    assert "carries no clientNonce timestamp" in check_request_time(None, NOW, 60)


def test_unusable_device_clock_is_refused_not_raised():
    for now in (math.nan, math.inf, -math.inf):
        for any_tz in (False, True):
            r = check_request_time(local(NOW), now, 60, any_tz)
            assert isinstance(r, str) and "unmeasurable" in r


def test_far_future_timestamp_is_refused():
    r = check_request_time("9999-12-31T23:59:59.999999Z", NOW, 60)
    assert isinstance(r, str) and "ahead of the device clock" in r


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.integers(), st.floats(), st.none(),
                 st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)
                              ).map(dart_iso)),
       st.floats(min_value=1, max_value=3600), st.booleans())
def test_never_raises_and_accepts_only_inside_the_window(nonce, window, any_tz):
    r = check_request_time(nonce, NOW, window, any_tz)
    assert isinstance(r, (Fresh, str))
    if isinstance(r, Fresh):
        assert abs(r.skew) <= window and r.expires >= NOW


# --- through the handler: refused requests get the error reply and nothing else ----------------

class CountingKeygen:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, algo: str) -> EphemeralKey:
        self.calls += 1
        return EphemeralKey("-----BEGIN OPENSSH PRIVATE KEY-----\nX\n-----END OPENSSH PRIVATE "
                            "KEY-----\n", "ssh-ed25519 AAAA")


def make_handler(clock: float = NOW, **kw) -> tuple[DaemonHandler, CountingKeygen]:
    base = {"atsign": "@device", "managers": ["@client"], "device": "pi", **kw}
    keygen = CountingKeygen()
    return DaemonHandler(build_config(base), DPRIV, keygen=keygen, clock=lambda: clock), keygen


def request(h: DaemonHandler, nonce, *, auth: bool = True, payload: dict | None = None) -> Request:
    if payload is None:
        payload = SshRequest(session_id=SID, host="127.0.0.1", port=40001,
                             authenticate_to_rvd=auth, client_nonce=nonce,
                             rvd_nonce=utc(NOW) if auth else None).to_dict()
    value = sign_envelope(payload, CPRIV)
    r = h.route(Inbound("n1", "@client", "@device:ssh_request.pi.sshnp@client", value))
    assert isinstance(r, Request)
    return r


def assert_refused(h: DaemonHandler, keygen: CountingKeygen, result, text: str) -> None:
    assert isinstance(result, Reply) and result.is_error, result
    assert result.to == "@client" and result.key_name == f"{SID}.pi.sshnp"
    assert result.value.startswith("Request refused: ") and text in result.value
    assert keygen.calls == 0  # no ephemeral key made, so none can be authorized


def test_request_without_nonce_is_refused():
    h, kg = make_handler()
    assert_refused(h, kg, h.on_ssh_request(request(h, None, auth=False), CPUB),
                   "no clientNonce")
    assert SID not in h.seen


@pytest.mark.parametrize("delta", [-61, 61, -13 * 3600, 3600])
def test_old_or_future_request_is_refused(delta):
    h, kg = make_handler()
    assert_refused(h, kg, h.on_ssh_request(request(h, utc(NOW + delta)), CPUB),
                   "the device clock")
    assert SID not in h.seen


@pytest.mark.parametrize("delta", [-60, 60, 0])
def test_boundary_request_is_served_once(delta):
    h, kg = make_handler()
    assert isinstance(h.on_ssh_request(request(h, utc(NOW + delta)), CPUB), SessionPlan)
    assert kg.calls == 1
    assert_refused(h, CountingKeygen(), h.on_ssh_request(request(h, utc(NOW + delta)), CPUB),
                   "already used")


def test_request_window_flag_moves_the_boundary():
    h, kg = make_handler(request_window=5)
    assert_refused(h, kg, h.on_ssh_request(request(h, utc(NOW - 6)), CPUB), "allowed: 5 s")
    h, kg = make_handler(request_window=300)
    assert isinstance(h.on_ssh_request(request(h, utc(NOW - 290)), CPUB), SessionPlan)


@pytest.mark.parametrize("nonce", [2 ** 63 - 1, -2 ** 63, ["2026"], {"t": 1}, True, None])
def test_wrong_typed_nonce_is_malformed_and_ignored(nonce):
    h, kg = make_handler()
    payload = {"direct": True, "sessionId": SID, "host": "127.0.0.1", "port": 40001,
               "authenticateToRvd": True, "clientNonce": nonce, "rvdNonce": utc(NOW)}
    r = h.on_ssh_request(request(h, None, payload=payload), CPUB)
    assert isinstance(r, Ignore) and r.event == "bad_request"
    assert kg.calls == 0 and SID not in h.seen


@pytest.mark.parametrize("nonce", ["1" * 400, "1e400", "NaN", "-Infinity"])
def test_unsignable_nonce_values_are_dropped(nonce):
    # numbers no Dart client can sign (huge ints, NaN, floats): the envelope cannot verify
    payload = (f'{{"direct":true,"sessionId":"{SID}","host":"h","port":1,'
               f'"authenticateToRvd":true,"clientNonce":{nonce},"rvdNonce":"x"}}')
    value = (f'{{"payload":{payload},"signature":"AAAA",'
             '"hashingAlgo":"sha256","signingAlgo":"rsa2048"}')
    h, kg = make_handler()
    r = h.route(Inbound("n1", "@client", "@device:ssh_request.pi.sshnp@client", value))
    assert isinstance(r, Request)
    out = h.on_ssh_request(r, CPUB)
    assert isinstance(out, Ignore) and out.event == "bad_signature"
    assert kg.calls == 0 and SID not in h.seen


@pytest.mark.parametrize("nonce", ["NaN", "Infinity", "1e309", "2026-02-30T00:00:00.000",
                                   "z" * 5000])
def test_unusable_nonce_string_is_refused(nonce):
    h, kg = make_handler()
    assert_refused(h, kg, h.on_ssh_request(request(h, nonce), CPUB), "not a timestamp")


def test_any_client_timezone_setting():
    h, kg = make_handler(any_client_timezone=True)
    assert isinstance(h.on_ssh_request(request(h, local(NOW + 2 * 3600 - 10)), CPUB),
                      SessionPlan)
    # the replay memory keeps it for as long as any zone offset could make it pass again
    assert SID in h.seen and h.seen._seen[SID] >= NOW + 2 * 3600 + 26 * 3600


@pytest.mark.parametrize("bad", ["0", "0.5", "-1", "3601", "nan", "inf", "x", "1e400"])
def test_request_window_flag_and_config_key_are_validated(bad, capsys):
    if bad == "x":  # argparse's own one-line error, exit status 2
        with pytest.raises(SystemExit) as ex:
            parse_args(["-a", "@d", "-m", "@c", "--request-window", bad])
        assert ex.value.code == 2 and "--request-window" in capsys.readouterr().err
    else:
        with pytest.raises(ConfigError, match="request.window"):
            parse_args(["-a", "@d", "-m", "@c", "--request-window", bad])
    with pytest.raises(ConfigError, match=r"request.window|:1: expected a number"):
        build_config({"atsign": "@d", "managers": ["@c"],
                      **parse_config_text(f"request_window = {bad}")})


def test_request_window_flag_and_config_key():
    assert parse_args(["-a", "@d", "-m", "@c"]).request_window == 60
    c = parse_args(["-a", "@d", "-m", "@c", "--request-window", "90", "--any-client-timezone",
                    "--storage-path", "/var/lib/x"])
    assert (c.request_window, c.any_client_timezone, str(c.storage_dir)) == (
        90, True, "/var/lib/x")
    c = build_config({"atsign": "@d", "managers": ["@c"], **parse_config_text(
        "request-window = 30\nany_client_timezone = yes\n")})
    assert (c.request_window, c.any_client_timezone) == (30, True)
    assert c.storage_dir.parts[-4:] == ("storage", "@d", "..sshnpd", "default")
