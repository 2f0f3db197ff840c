"""Key names K1-K9 (docs/reference/noports-protocol.md#key-names), device-name rules and each role's subscription regexes."""

import json
import re
from pathlib import Path

import pytest

from noports.npproto import keys
from noports.npproto.errors import ProtocolError

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "npproto"
SID = "a4b8a23e-b39f-4aa7-9991-ec7923a37192"
C, D, R, DEV = "@cconstab", "@ssh_1", "@rv_eu", "orac"


def test_builders_match_reference_table():
    assert keys.relay_request_key(R, DEV, C) == "@rv_eu:orac.request_ports.sshrvd@cconstab"
    assert keys.legacy_relay_request_key(R, DEV, C) == "@rv_eu:orac.sshrvd@cconstab"
    assert keys.relay_response_key(C, SID, R) == f"@cconstab:{SID}.sshrvd@rv_eu"
    assert keys.ping_key(D, DEV, C) == "@ssh_1:ping.orac.sshnp@cconstab"
    assert keys.heartbeat_key(C, DEV, D) == "@cconstab:heartbeat.orac.sshnp@ssh_1"
    assert keys.ssh_request_key(D, DEV, C) == "@ssh_1:ssh_request.orac.sshnp@cconstab"
    assert keys.npt_request_key(D, DEV, C) == "@ssh_1:npt_request.orac.sshnp@cconstab"
    assert keys.session_response_key(C, SID, DEV, D) == f"@cconstab:{SID}.orac.sshnp@ssh_1"
    assert keys.sshpublickey_key(D, DEV, C) == "@ssh_1:sshpublickey.orac.sshnp@cconstab"
    assert keys.username_key(C, DEV, D) == "@cconstab:username.orac.sshnp@ssh_1"
    assert keys.device_info_key(C, DEV, D) == "@cconstab:device_info.orac.sshnp@ssh_1"


def test_fixture_pr751_key_and_subscriptions():
    fx = json.loads((FIX / "m1_relay_request.json").read_text())
    assert keys.relay_request_key("rv_eu", DEV, "CConstab") == fx["key"]
    assert [keys.client_relay_response_regex(SID),
            keys.client_session_response_regex(SID, DEV, D)] == fx["client_subscriptions"]


def test_subscription_regexes_select_the_right_keys():
    daemon = re.compile(keys.daemon_subscription_regex(DEV))
    assert keys.daemon_subscription_regex(DEV) == r"orac\.sshnp@"
    assert daemon.search(keys.ssh_request_key(D, DEV, C))
    assert not daemon.search(keys.ssh_request_key(D, "other", C))
    relay = re.compile(keys.relay_subscription_regex())
    assert relay.search(keys.relay_request_key(R, DEV, C))
    assert not relay.search(keys.ping_key(D, DEV, C))
    hb = re.compile(keys.client_heartbeat_regex(DEV))
    assert hb.search(keys.heartbeat_key(C, DEV, D)) and not hb.search(keys.username_key(C, DEV, D))


@pytest.mark.parametrize("name", ["orac", "default", "my_pi_3", "ab", "a-b", "_x", "0" * 36])
def test_valid_device_names(name):
    assert keys.validate_device_name(name) == name


@pytest.mark.parametrize(("name", "why"), [
    ("", "empty"), ("a", "too short"), ("x" * 37, "maximum is 36"), ("Orac", "lower case"),
    ("-dev", "start with '-'"), ("my.dev", r"contains '\.'"), ("dev@x", "contains '@'"),
    ("my dev", "contains ' '"), ("dév", "contains 'é'"),
])
def test_invalid_device_names_have_clear_errors(name, why):
    with pytest.raises(ProtocolError, match=why):
        keys.validate_device_name(name)
    with pytest.raises(ProtocolError):
        keys.ssh_request_key(D, name, C)


def test_snakify():
    assert keys.snakify_device_name("My  Raspberry\tPi") == "my_raspberry_pi"


def test_bad_atsign_and_session_id():
    with pytest.raises(ProtocolError, match="atSign"):
        keys.ping_key("@a:b", DEV, C)
    with pytest.raises(ProtocolError, match="session id"):
        keys.session_response_key(C, "not-a-uuid", DEV, D)
    with pytest.raises(ProtocolError, match="session id"):
        keys.relay_response_key(C, SID.upper(), R)
    assert keys.validate_session_id(keys.new_session_id())


@pytest.mark.parametrize("kind", keys.DAEMON_KINDS)
def test_parse_daemon_key(kind):
    k = keys.parse_daemon_key(f"@ssh_1:{kind}.orac.sshnp@cconstab", DEV)
    assert (k.kind, k.sender, k.recipient, k.device) == (kind, C, D, DEV)


def test_parse_daemon_key_lowercases_and_rejects():
    assert keys.parse_daemon_key("@SSH_1:Ping.orac.sshnp@CConstab", DEV).kind == "ping"
    with pytest.raises(ProtocolError, match="unknown daemon request kind"):
        keys.parse_daemon_key("@ssh_1:reboot.orac.sshnp@cconstab", DEV)
    with pytest.raises(ProtocolError, match="not for device"):
        keys.parse_daemon_key("@ssh_1:ping.other.sshnp@cconstab", DEV)
    with pytest.raises(ProtocolError, match="shared atKey"):
        keys.parse_daemon_key("public:ping.orac.sshnp@cconstab", DEV)


def test_parse_relay_key():
    k = keys.parse_relay_key("@rv_eu:orac.request_ports.sshrvd@cconstab")
    assert (k.device, k.legacy, k.sender) == (DEV, False, C)
    assert keys.parse_relay_key("@rv_eu:orac.sshrvd@cconstab").legacy is True
    with pytest.raises(ProtocolError):
        keys.parse_relay_key("@rv_eu:orac.sshnp@cconstab")


def test_parse_client_key():
    assert keys.parse_client_key(f"@cconstab:{SID}.sshrvd@rv_eu").kind == "relay_response"
    sr = keys.parse_client_key(f"@cconstab:{SID}.orac.sshnp@ssh_1")
    assert (sr.kind, sr.session_id, sr.device, sr.sender) == ("session_response", SID, DEV, D)
    for kind in ("heartbeat", "username", "device_info"):
        assert keys.parse_client_key(f"@cconstab:{kind}.orac.sshnp@ssh_1").kind == kind
    with pytest.raises(ProtocolError):
        keys.parse_client_key("@cconstab:ssh_request.orac.sshnp@ssh_1")
