"""The sshnp session flow against an in-memory fake plane (relay + device behaviour).

The fake client implements the handful of AtClient calls the flow uses (notify, monitor,
public_key, get_shared, shared_key_by_other, close); relays and the device answer through
the fake monitor exactly as the real ones do on the wire (CSV, signed envelopes, plain error
strings, heartbeats), so the state machine is tested without sockets or servers.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from noports import crypto
from noports.atclient.e2e import Notification
from noports.client.errors import (
    DeviceRefused,
    DeviceTimeout,
    RelayError,
    SecurityError,
    SshnpError,
)
from noports.client.flow import fast_sign_envelope, open_session
from noports.client.params import SessionParams
from noports.client.progress import Progress
from noports.keys.atkeys import generate_atkeys
from noports.npproto import keys as npkeys
from noports.npproto.envelope import (
    relay_auth_payload,
    sign_envelope,
    verify_envelope,
    verify_relay_auth,
)
from noports.npproto.messages import DeviceInfo, SessionResponse, SshRequest

CLIENT, DEVICE, R1, R2 = "@alice", "@dev", "@r1", "@r2"
HOST_KEY = ("ssh-ed25519 " + base64.b64encode(
    b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + b"k" * 32).decode() + " root@box")

_KEYS: dict[str, Any] = {}


def keys(atsign: str):
    if atsign not in _KEYS:
        _KEYS[atsign] = generate_atkeys(atsign)
    return _KEYS[atsign]


class FakeMonitor:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Notification] = asyncio.Queue()

    def start(self) -> FakeMonitor:
        return self

    def __aiter__(self) -> FakeMonitor:
        return self

    async def __anext__(self) -> Notification:
        return await self.queue.get()

    async def aclose(self) -> None:
        pass


class FakePlane:
    """AtClient stand-in for @alice, with scripted relays and device."""

    def __init__(self, *, relays: dict[str, bool] | None = None, device: str = "ok",
                 heartbeat: dict[str, bool] | None = None, cipher: str | None = None,
                 device_key: Any = None, payload_hook: Callable[[dict], None] | None = None):
        self.keys = keys(CLIENT)
        self.relays = relays if relays is not None else {R1: True}
        self.device = device  # ok | silent | error | badsig
        self.heartbeat = heartbeat
        self.cipher = cipher
        self.device_key = device_key or keys(DEVICE)
        self.payload_hook = payload_hook
        self.monitor_obj = FakeMonitor()
        self.sent: list[tuple[str, str, str]] = []
        self.requests: list[SshRequest] = []
        self.rvd_nonce = "2024-01-27T08:48:00.911746"
        self.pk_fetches = 0
        self.closed = False

    def monitor(self, regex: str, since_ms: int | None = None) -> FakeMonitor:
        self.regex = regex
        return self.monitor_obj

    def _push(self, frm: str, key_name: str, value: str) -> None:
        n = Notification(id=os.urandom(4).hex(), from_atsign=frm, to_atsign=CLIENT,
                         key=f"{CLIENT}:{key_name}{frm}", value=value,
                         epoch_millis=int(time.time() * 1000))
        asyncio.get_running_loop().call_later(0.01, self.monitor_obj.queue.put_nowait, n)

    async def notify(self, to: str, key_name: str, value: str, **kw: Any) -> str:
        self.sent.append((to, key_name, value))
        if key_name.endswith(".request_ports.sshrvd"):
            if self.relays.get(to):
                sid = value.split('"sessionId":"')[1].split('"')[0]
                self._push(to, f"{sid}.sshrvd", f"127.0.0.1,4001,4002,{self.rvd_nonce}")
        elif key_name.startswith("ping."):
            if self.heartbeat is not None:
                info = DeviceInfo(devicename="box", version="9.9", core_package_version="x",
                                  supported_features=self.heartbeat)
                self._push(DEVICE, "heartbeat.box.sshnp", info.to_json())
        elif key_name.startswith("ssh_request."):
            self._answer(value)
        return "id"

    def _answer(self, envelope: str) -> None:
        req = SshRequest.from_dict(verify_envelope(envelope, keys(CLIENT).encrypt_public))
        self.requests.append(req)
        name = f"{req.session_id}.box.sshnp"
        if self.device == "silent":
            return
        if self.device == "error":
            self._push(DEVICE, name, "Daemon does not permit connections to localhost:22")
            return
        aes_ct = iv_ct = None
        if req.encrypt_rvd_traffic:
            aes_ct = crypto.rsa_encrypt(req.client_ephemeral_pk,
                                        base64.b64encode(os.urandom(32)).decode())
            iv_ct = crypto.rsa_encrypt(req.client_ephemeral_pk,
                                       base64.b64encode(os.urandom(16)).decode())
        resp = SessionResponse(session_id=req.session_id, ephemeral_private_key="k",
                               session_aes_key=aes_ct, session_iv=iv_ct,
                               host_keys=[HOST_KEY], np_cipher=self.cipher or (
                                   req.np_ciphers or [None])[0])
        payload = resp.to_dict()
        if self.payload_hook:
            self.payload_hook(payload)
        signer = keys("@mallory") if self.device == "badsig" else self.device_key
        self._push(DEVICE, name, sign_envelope(payload, signer.encrypt_private))

    async def public_key(self, atsign: str) -> str:
        self.pk_fetches += 1
        return keys(atsign).encrypt_public

    async def shared_key_by_other(self, atsign: str) -> str:
        return "x"

    async def get_shared(self, name: str, **kw: Any) -> str | None:
        return "pi"

    async def close(self) -> None:
        self.closed = True


class RelayDialer:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[str, int, bytes]] = []
        self.peers: list[socket.socket] = []

    async def __call__(self, host: str, port: int, auth_line: bytes, **kw: Any) -> socket.socket:
        self.calls.append((host, port, auth_line))
        if self.fail:
            raise ConnectionRefusedError(111, "Connection refused")
        a, b = socket.socketpair()
        self.peers.append(b)
        return a


def params(tmp_path: Path, **kw: Any) -> SessionParams:
    base: dict[str, Any] = dict(client_atsign=CLIENT, device_atsign=DEVICE, relays=[R1],
                                device="box", remote_user="pi", cache_dir=tmp_path / "cache",
                                relay_timeout=0.5, daemon_timeout=0.5,
                                relay_select="ordered")  # the fallback tests below
    base.update(kw)
    return SessionParams(**base)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_happy_path_aes(tmp_path: Path) -> None:
    plane, dial = FakePlane(heartbeat={"srAuth": True, "srE2ee": True}), RelayDialer()
    prog = Progress(quiet=True)
    s = run(open_session(params(tmp_path), progress=prog, client=plane, connect_relay=dial))
    try:
        assert s.cipher == "chacha20-poly1305-v1"
        assert s.remote_user == "pi"
        assert s.host_key_alias == "dev/box"
        assert s.known_hosts is not None
        assert s.known_hosts.read_text().split()[:2] == ["dev/box", "ssh-ed25519"]
        req = plane.requests[0]
        assert req.encrypt_rvd_traffic and req.authenticate_to_rvd
        assert req.np_ciphers == ["chacha20-poly1305-v1", "aes-256-ctr"]
        assert req.port == 4002 and req.host == "127.0.0.1"
        host, port, line = dial.calls[0]
        assert (host, port) == ("127.0.0.1", 4001)
        assert verify_relay_auth(line.rstrip(b"\n"), req.session_id, req.client_nonce,
                                 plane.rvd_nonce, keys(CLIENT).encrypt_public)
        # the relay request is the first thing sent; the monitor regex covers the answers
        assert plane.sent[0][1] == "box.request_ports.sshrvd"
        assert npkeys.parse_client_key(f"{CLIENT}:{req.session_id}.sshrvd{R1}")
        assert any("signature verified" in ln for ln in prog.lines)
        assert set(s.timings) >= {"relay_answered", "device_answered", "tunnel_ready"}
    finally:
        s.close()


def test_device_public_key_is_cached_on_disk(tmp_path: Path) -> None:
    plane = FakePlane()
    run(open_session(params(tmp_path), client=plane, connect_relay=RelayDialer())).close()
    cached = tmp_path / "cache" / "cached_pks" / "dev"
    assert cached.read_text() == keys(DEVICE).encrypt_public
    plane2 = FakePlane()
    run(open_session(params(tmp_path), client=plane2, connect_relay=RelayDialer())).close()
    assert plane2.pk_fetches == 0


def test_stale_cached_key_is_refetched(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "cached_pks"
    cache.mkdir(parents=True)
    (cache / "dev").write_text(keys("@old").encrypt_public)
    plane = FakePlane()
    run(open_session(params(tmp_path), client=plane, connect_relay=RelayDialer())).close()
    assert plane.pk_fetches == 1
    assert (cache / "dev").read_text() == keys(DEVICE).encrypt_public


def test_aes_ctr_when_device_does_not_negotiate(tmp_path: Path) -> None:
    plane = FakePlane(payload_hook=lambda p: p.pop("npCipher", None))
    s = run(open_session(params(tmp_path), client=plane, connect_relay=RelayDialer()))
    assert s.cipher == "aes-256-ctr"
    s.close()


def test_relay_fallback_to_second(tmp_path: Path) -> None:
    plane, prog = FakePlane(relays={R1: False, R2: True}), Progress(quiet=True)
    s = run(open_session(params(tmp_path, relays=[R1, R2], relay_timeout=0.2), progress=prog,
                         client=plane, connect_relay=RelayDialer()))
    assert s.relay_atsign == R2
    assert any("relay @r1 did not answer within 0.2s; trying the next relay" in ln
               for ln in prog.lines)
    s.close()


def test_relay_port_unreachable_falls_back_with_new_session(tmp_path: Path) -> None:
    class Dial(RelayDialer):
        async def __call__(self, host: str, port: int, line: bytes, **kw: Any):
            self.fail = not self.calls
            return await super().__call__(host, port, line, **kw)
    plane = FakePlane(relays={R1: True, R2: True})
    s = run(open_session(params(tmp_path, relays=[R1, R2]), client=plane, connect_relay=Dial()))
    assert s.relay_atsign == R2
    assert len({r.session_id for r in plane.requests}) == 2
    s.close()


class FailingNotifyPlane(FakePlane):
    """Notifies to atSigns in ``fail`` raise the given atclient error."""

    def __init__(self, fail: dict[str, BaseException], **kw: Any) -> None:
        super().__init__(**kw)
        self.fail = fail
        self.tried: list[str] = []

    async def notify(self, to: str, key_name: str, value: str, **kw: Any) -> str:
        self.tried.append(to)
        if to in self.fail:
            raise self.fail[to]
        return await super().notify(to, key_name, value, **kw)


def test_unknown_relay_atsign_falls_back_to_the_next(tmp_path: Path) -> None:
    from noports.atclient.connection import AtProtocolError
    plane = FailingNotifyPlane({R1: AtProtocolError("AT0007", "Secondary server not found")},
                               relays={R2: True})
    prog = Progress(quiet=True)
    s = run(open_session(params(tmp_path, relays=[R1, R2]), progress=prog, client=plane,
                         connect_relay=RelayDialer()))
    assert s.relay_atsign == R2
    assert any("sending the relay request to @r1" in ln and "trying the next relay" in ln
               for ln in prog.lines), prog.lines
    s.close()


def test_unknown_single_relay_is_a_relay_error(tmp_path: Path) -> None:
    from noports.atclient.connection import AtSecondaryNotFound
    plane = FailingNotifyPlane({R1: AtSecondaryNotFound("@r1 is not in the directory")})
    with pytest.raises(RelayError) as ei:
        run(open_session(params(tmp_path), client=plane, connect_relay=RelayDialer()))
    assert ei.value.exit_code == 5
    assert "registered in the directory" in (ei.value.hint or "")


def test_own_atserver_failure_does_not_walk_the_relay_list(tmp_path: Path) -> None:
    from noports.atclient.connection import AtConnectError
    plane = FailingNotifyPlane({R1: AtConnectError("connection reset"),
                                R2: AtConnectError("connection reset")})
    with pytest.raises(SshnpError) as ei:
        run(open_session(params(tmp_path, relays=[R1, R2]), client=plane,
                         connect_relay=RelayDialer()))
    assert not isinstance(ei.value, RelayError) and ei.value.exit_code == 4
    assert plane.tried == [R1]  # stopped at the first relay


def test_no_relay_answers(tmp_path: Path) -> None:
    plane = FakePlane(relays={})
    with pytest.raises(RelayError) as ei:
        run(open_session(params(tmp_path, relays=[R1, R2], relay_timeout=0.1), client=plane,
                         connect_relay=RelayDialer()))
    assert ei.value.exit_code == 5
    assert "none of the relays @r1, @r2 worked" in str(ei.value)
    assert "is srvd running" in str(ei.value)


def test_device_silent_without_heartbeat(tmp_path: Path) -> None:
    with pytest.raises(DeviceTimeout) as ei:
        run(open_session(params(tmp_path), client=FakePlane(device="silent"),
                         connect_relay=RelayDialer()))
    assert "box@dev did not answer within 0.5s" in str(ei.value)
    assert "is sshnpd running as @dev with -d box" in str(ei.value)
    assert ei.value.exit_code == 6


def test_device_silent_but_pinged(tmp_path: Path) -> None:
    plane = FakePlane(device="silent", heartbeat={"srAuth": True, "srE2ee": True})
    with pytest.raises(DeviceTimeout) as ei:
        run(open_session(params(tmp_path), client=plane, connect_relay=RelayDialer()))
    assert "answered the ping but not the session request" in str(ei.value)


def test_missing_feature_fails_early(tmp_path: Path) -> None:
    plane = FakePlane(device="silent", heartbeat={"srAuth": True, "srE2ee": False})
    t0 = time.monotonic()
    with pytest.raises(DeviceRefused) as ei:
        run(open_session(params(tmp_path, daemon_timeout=5), client=plane,
                         connect_relay=RelayDialer()))
    assert time.monotonic() - t0 < 2
    assert "does not support srE2ee" in str(ei.value)


def test_device_error_string(tmp_path: Path) -> None:
    with pytest.raises(DeviceRefused) as ei:
        run(open_session(params(tmp_path), client=FakePlane(device="error"),
                         connect_relay=RelayDialer()))
    assert "refused: Daemon does not permit connections to localhost:22" in str(ei.value)
    assert ei.value.exit_code == 7


def test_bad_signature(tmp_path: Path) -> None:
    with pytest.raises(SecurityError) as ei:
        run(open_session(params(tmp_path), client=FakePlane(device="badsig"),
                         connect_relay=RelayDialer()))
    assert "failed verification" in str(ei.value) and ei.value.exit_code == 8


def test_signed_response_for_other_session(tmp_path: Path) -> None:
    plane = FakePlane(payload_hook=lambda p: p.update(sessionId=npkeys.new_session_id()))
    with pytest.raises(SecurityError, match="is for session"):
        run(open_session(params(tmp_path), client=plane, connect_relay=RelayDialer()))


def test_cipher_not_offered(tmp_path: Path) -> None:
    plane = FakePlane(cipher="rot13")
    with pytest.raises(SecurityError, match="not offered"):
        run(open_session(params(tmp_path, ciphers=("aes-256-ctr",)), client=plane,
                         connect_relay=RelayDialer()))


def test_username_needed_but_missing(tmp_path: Path) -> None:
    class NoUser(FakePlane):
        async def get_shared(self, name: str, **kw: Any) -> str | None:
            return None
    with pytest.raises(DeviceRefused, match="has not shared its username"):
        run(open_session(params(tmp_path, remote_user=None), client=NoUser(),
                         connect_relay=RelayDialer()))


def test_username_from_device_record(tmp_path: Path) -> None:
    s = run(open_session(params(tmp_path, remote_user=None), client=FakePlane(),
                         connect_relay=RelayDialer()))
    assert s.remote_user == "pi"
    s.close()


def test_stdio_aes_needs_no_username(tmp_path: Path) -> None:
    class NoUser(FakePlane):
        async def get_shared(self, name: str, **kw: Any) -> str | None:
            raise AssertionError("username must not be looked up")
    s = run(open_session(params(tmp_path, remote_user=None, need_remote_user=False),
                         client=NoUser(), connect_relay=RelayDialer()))
    assert s.remote_user is None
    s.close()


def test_fast_signer_matches_npproto() -> None:
    k = keys(CLIENT).encrypt_private
    payload = relay_auth_payload(npkeys.new_session_id(), "2024-01-01T00:00:00.000001", "n")
    assert fast_sign_envelope(payload, k) == sign_envelope(payload, k)
    req = SshRequest(session_id=npkeys.new_session_id(), host="h", port=1, np_ciphers=["a"])
    assert fast_sign_envelope(req.to_dict(), k) == sign_envelope(req.to_dict(), k)


def test_send_ssh_public_key_before_session_request(tmp_path: Path) -> None:
    ident = tmp_path / "id_ed25519"
    (tmp_path / "id_ed25519.pub").write_text(HOST_KEY + "\n")
    plane = FakePlane(heartbeat={"srAuth": True, "srE2ee": True, "acceptsPublicKeys": True})
    s = run(open_session(params(tmp_path, identity_file=ident, send_ssh_public_key=True),
                         client=plane, connect_relay=RelayDialer()))
    s.close()
    names = [name for _, name, _ in plane.sent]
    assert names.index("sshpublickey.box.sshnp") < names.index("ssh_request.box.sshnp")
    assert [v for _, n, v in plane.sent if n == "sshpublickey.box.sshnp"] == [HOST_KEY]


def test_send_ssh_public_key_also_when_the_first_relay_is_down(tmp_path: Path) -> None:
    """-s with a relay list: the key goes out once, before the request via the second relay
    (it used to be sent only when the first relay answered)."""
    ident = tmp_path / "id_ed25519"
    (tmp_path / "id_ed25519.pub").write_text(HOST_KEY + "\n")
    plane = FakePlane(relays={R1: False, R2: True},
                      heartbeat={"srAuth": True, "srE2ee": True, "acceptsPublicKeys": True})
    s = run(open_session(params(tmp_path, identity_file=ident, send_ssh_public_key=True,
                                relays=[R1, R2], relay_timeout=0.2),
                         client=plane, connect_relay=RelayDialer()))
    s.close()
    assert s.relay_atsign == R2
    names = [name for _, name, _ in plane.sent]
    assert names.count("sshpublickey.box.sshnp") == 1
    assert names.index("sshpublickey.box.sshnp") < names.index("ssh_request.box.sshnp")


def test_send_ssh_public_key_missing_pub(tmp_path: Path) -> None:
    from noports.client.errors import KeysError
    with pytest.raises(KeysError, match="cannot read"):
        run(open_session(params(tmp_path, identity_file=tmp_path / "nope",
                                send_ssh_public_key=True), client=FakePlane(),
                         connect_relay=RelayDialer()))


def test_hostile_heartbeats_are_ignored(tmp_path: Path) -> None:
    """Ping answers that are not device info (nested 5000 deep, a list, a huge integer) or
    that come from another atSign neither crash the flow nor fail the session early."""
    class Hostile(FakePlane):
        async def notify(self, to: str, key_name: str, value: str, **kw: Any) -> str:
            if key_name.startswith("ping."):
                for bad in ('{"devicename": "box", "x": ' + "[" * 5000 + "]" * 5000 + "}",
                            "[1, 2]", '{"devicename": "box", "n": ' + "9" * 5000 + "}"):
                    self._push(DEVICE, "heartbeat.box.sshnp", bad)
                lie = DeviceInfo(devicename="box", version="1", core_package_version="x",
                                 supported_features={"srAuth": False})
                self._push("@mallory", "heartbeat.box.sshnp", lie.to_json())
                return "id"
            return await super().notify(to, key_name, value, **kw)

    s = run(open_session(params(tmp_path), client=Hostile(), connect_relay=RelayDialer()))
    assert s.device_info is None and s.session_id
    s.close()


def test_huge_session_response_is_a_security_error(tmp_path: Path) -> None:
    plane = FakePlane(payload_hook=lambda p: p.update(pad="x" * 70_000))
    with pytest.raises(SecurityError, match="more than the 65536 a device sends") as ei:
        run(open_session(params(tmp_path), client=plane, connect_relay=RelayDialer()))
    assert ei.value.exit_code == 8


class StalledLookupPlane(FakePlane):
    """The device's public-key lookup is sent but its reply never comes (lost under load)."""

    async def public_key(self, atsign: str) -> str:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_stalled_lookup_ends_within_the_setup_limit_naming_the_step(tmp_path: Path) -> None:
    from noports.client.flow import setup_limit
    p = params(tmp_path, connect_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(SshnpError) as ei:
        run(open_session(p, client=StalledLookupPlane(), connect_relay=RelayDialer()))
    assert time.monotonic() - t0 < 20  # run() itself gives up at 20 s: this is a hang check
    assert ei.value.exit_code == 4
    assert str(ei.value).startswith("atServer: fetching the public key of @dev: no progress "
                                     f"within the set-up limit of {setup_limit(p):g}s")


class UnknownDevicePlane(FailingNotifyPlane):
    """The directory knows no device atSign; the relay stays silent (srvd refusing quietly,
    as in issue 15) or refuses naming it."""

    def __init__(self, nack: bool = False) -> None:
        from noports.atclient.connection import AtProtocolError
        super().__init__({DEVICE: AtProtocolError("AT0007", "Secondary server not found")},
                         relays={})
        self.nack = nack

    async def notify(self, to: str, key_name: str, value: str, **kw: Any) -> str:
        if self.nack and key_name.endswith(".request_ports.sshrvd"):
            sid = value.split('"sessionId":"')[1].split('"')[0]
            self._push(to, f"nack.{sid}.sshrvd", f"cannot fetch the public key of {DEVICE}")
        return await super().notify(to, key_name, value, **kw)

    async def public_key(self, atsign: str) -> str:
        from noports.atclient.connection import AtSecondaryNotFound
        if atsign == DEVICE:
            await asyncio.sleep(0.05)
            raise AtSecondaryNotFound(f"{DEVICE} is not registered in 127.0.0.1:64")
        return await super().public_key(atsign)


@pytest.mark.parametrize("nack", [False, True])
def test_unknown_device_atsign_is_named_without_waiting_for_the_relay(tmp_path: Path,
                                                                     nack: bool) -> None:
    """Before: the lookup's AT0007 was dropped ("Task exception was never retrieved") and
    the client waited the whole relay timeout, then blamed the relay."""
    t0 = time.monotonic()
    with pytest.raises(DeviceRefused) as ei:
        run(open_session(params(tmp_path, relay_timeout=30), client=UnknownDevicePlane(nack),
                         connect_relay=RelayDialer()))
    assert time.monotonic() - t0 < 10  # not the 30 s relay timeout (hang guard)
    assert str(ei.value).startswith(f"device: device atSign {DEVICE} is unknown: ")
    assert "check -t/--to" in str(ei.value) and ei.value.exit_code == 7


def test_unknown_client_atsign_is_not_blamed_on_the_relay(tmp_path: Path) -> None:
    from noports.atclient.connection import AtSecondaryNotFound
    plane = FailingNotifyPlane({R1: AtSecondaryNotFound(f"{CLIENT} is not registered in x")})
    with pytest.raises(SshnpError) as ei:
        run(open_session(params(tmp_path), client=plane, connect_relay=RelayDialer()))
    assert not isinstance(ei.value, RelayError) and ei.value.exit_code == 4
    assert str(ei.value).startswith(f"atServer: client atSign {CLIENT} is unknown: ")
