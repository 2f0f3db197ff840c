"""sshnpd as a real subprocess against a real plane, a real OpenSSH sshd and a stand-in relay.

The test plays the client (@client) with the asyncio AtClient and plays the socket rendezvous
with a loopback listening socket (port B): it reads and checks the daemon's relay auth line,
then speaks to whatever the daemon pumps - in plain mode a real SSH session (paramiko)
authenticated with the ephemeral key from the signed response, against our test sshd.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import paramiko
import pytest

from noports import crypto
from noports.atclient.aio import AtClient
from noports.daemon.authorized_keys import AuthorizedKeys
from noports.keys.atkeys import AtKeys
from noports.npproto import (
    CIPHER_AES_CTR,
    CIPHER_CHACHA20_POLY1305,
    SessionResponse,
    SshRequest,
    dart_iso_now,
    sign_envelope,
    verify_envelope,
    verify_relay_auth,
)
from noports.npproto.streamcipher import decode_session_secrets, new_session_cipher
from tests.harness.plane import Plane, Proc, free_port, spawn
from tests.harness.sshd import SSHD, start_sshd

pytestmark = pytest.mark.integration
DEV = "pi"


class Env:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.plane = Plane(base / "plane", keys_dir=base / "keys")
        self.keys: dict[str, AtKeys] = self.plane.populate(
            {"srv": ["@device", "@client", "@eve", "@relay"]})
        self.server = self.plane.servers[0]
        self.ctx = self.plane.ssl_context()
        self.root = self.plane.root_tuple
        self.keys_dir = self.plane.keys_dir
        self.sshd_dir = base / "sshd"
        self.ak_path = base / "home" / ".ssh" / "authorized_keys"
        self.sshd_port = free_port()
        self.sshd, _key = start_sshd(self.sshd_dir, port=self.sshd_port,
                                     authorized_keys=self.ak_path)
        self.host_key = (self.sshd_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        self.user = __import__("pwd").getpwuid(os.geteuid()).pw_name
        self.daemons: list[Proc] = []

    def start_daemon(self, *extra: str, device: str = DEV) -> Proc:
        proc = spawn([sys.executable, "-m", "noports.daemon.cli", "-a", "@device",
                      "-m", "@client", "-d", device,
                      "-k", str(self.keys_dir / "@device_key.atKeys"),
                      "--root-domain", self.plane.root, "--ca-file", str(self.plane.tls.ca_cert),
                      "--authorized-keys", str(self.ak_path),
                      "--sshd-host-keys", str(self.sshd_dir / "*.pub"),
                      "--local-sshd-port", str(self.sshd_port), "--log-format", "json",
                      "--storage-path", str(self.base / "state" / device), *extra])
        proc.wait_for(r'"event": "ready"', timeout=30)
        self.daemons.append(proc)
        return proc

    def start_relay(self) -> Proc:
        """A real srvd (for the tests that run the real sshnp client)."""
        if getattr(self, "relay", None) is None:
            self.relay = spawn([sys.executable, "-m", "noports.relay.srvd_cli", "-a", "@relay",
                                "-k", str(self.keys_dir / "@relay_key.atKeys"),
                                "--root-domain", self.plane.root,
                                "--ca-file", str(self.plane.tls.ca_cert),
                                "-i", "127.0.0.1", "--bind", "127.0.0.1"])
            self.relay.wait_for(r"ready", timeout=20)
            self.daemons.append(self.relay)
        return self.relay

    async def client(self, atsign: str = "@client") -> AtClient:
        return await AtClient.connect(atsign, self.keys[atsign], self.root, self.ctx)

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()
        self.sshd.stop()
        self.plane.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not (os.path.exists(SSHD) and shutil.which("ssh-keygen")):
        pytest.skip("OpenSSH sshd/ssh-keygen not installed")
    if os.geteuid() != 0 and not os.path.isdir("/run/sshd"):
        pytest.skip("sshd needs /run/sshd (create it as root)")
    e = Env(tmp_path_factory.mktemp("sshnpd"))
    e.daemon = e.start_daemon("--ephemeral-key-ttl", "5")
    yield e
    if os.environ.get("SSHNPD_TEST_LOGS"):
        for d in e.daemons:
            print("\n".join(d.lines))
    e.stop()


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make_request(keys: AtKeys, port: int, *, encrypt: bool, ciphers: list[str] | None = None,
                 session_pk: str | None = None) -> tuple[str, str, str, str]:
    """(sid, clientNonce, rvdNonce, signed envelope) of an ssh_request naming relay port B."""
    sid, cn, rn = str(uuid.uuid4()), dart_iso_now(), dart_iso_now()
    req = SshRequest(session_id=sid, host="127.0.0.1", port=port, authenticate_to_rvd=True,
                     client_nonce=cn, rvd_nonce=rn, encrypt_rvd_traffic=encrypt,
                     client_ephemeral_pk=session_pk if encrypt else None,
                     client_ephemeral_pk_type="rsa2048" if encrypt else None,
                     np_ciphers=ciphers)
    return sid, cn, rn, sign_envelope(req.to_dict(), keys.encrypt_private)


async def request_session(env: Env, listener: socket.socket, *, encrypt: bool,
                          ciphers: list[str] | None = None, session_pk: str | None = None,
                          device: str = DEV):
    """Send ssh_request as @client; return (sid, cn, rn, response text)."""
    c = await env.client()
    try:
        sid, cn, rn, value = make_request(env.keys["@client"], listener.getsockname()[1],
                                          encrypt=encrypt, ciphers=ciphers,
                                          session_pk=session_pk)
        mon = c.monitor(f"{sid}.{device}.sshnp@device")
        await mon.wait_ready(10)
        await c.notify("@device", f"ssh_request.{device}.sshnp", value, ttl_ms=10_000)
        n = await asyncio.wait_for(mon.__anext__(), 15)
        assert n.from_atsign == "@device"
        return sid, cn, rn, n.value
    finally:
        await c.close()


def accept_relay_side(listener: socket.socket, sid: str, cn: str, rn: str,
                      device_pk: str) -> socket.socket:
    """Our stand-in relay: accept port B, read and verify the daemon's auth line."""
    listener.settimeout(10)
    sock, _ = listener.accept()
    sock.settimeout(10)
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "daemon closed before its auth line"
        line += chunk
    assert verify_relay_auth(line.rstrip(b"\n"), sid, cn, rn, device_pk)
    return sock


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    return s


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------------------------

def test_ping_gets_heartbeat_and_username_is_shared(env):
    async def main():
        c = await env.client()
        try:
            mon = c.monitor(f"heartbeat.{DEV}.sshnp")
            await mon.wait_ready(10)
            await c.notify("@device", f"ping.{DEV}.sshnp", "ping")
            n = await asyncio.wait_for(mon.__anext__(), 15)
            username = await c.get_shared(f"username.{DEV}.sshnp", shared_by="@device")
            return n, username
        finally:
            await c.close()

    n, username = run(main())
    assert n.from_atsign == "@device"
    info = json.loads(n.value)
    assert info["devicename"] == DEV
    assert info["supportedFeatures"]["srAuth"] and info["supportedFeatures"]["srE2ee"]
    assert info["allowedServices"] == [f"localhost:{env.sshd_port}"]
    assert username == env.user


def test_non_manager_gets_no_reply_and_nothing_changes(env):
    before = env.ak_path.read_bytes() if env.ak_path.exists() else b""
    start = len(env.daemon.lines)

    async def main():
        c = await env.client("@eve")
        try:
            lst = listener()
            sid, _, _, value = make_request(env.keys["@eve"], lst.getsockname()[1],
                                            encrypt=False)
            mon = c.monitor(f"{sid}.{DEV}.sshnp@device")
            await mon.wait_ready(10)
            await c.notify("@device", f"ssh_request.{DEV}.sshnp", value)
            await c.notify("@device", f"ping.{DEV}.sshnp", "ping")
            env.daemon.wait_for(r'"event": "unauthorized".*"sender": "@eve"', 15, start)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(mon.__anext__(), 1.5)
            lst.settimeout(0.2)
            with pytest.raises(socket.timeout):
                lst.accept()  # the daemon never dialled the relay
            lst.close()
        finally:
            await c.close()

    run(main())
    after = env.ak_path.read_bytes() if env.ak_path.exists() else b""
    assert after == before


def test_plain_session_key_logs_in_to_real_sshd_and_expires(env):
    lst = listener()
    sid, cn, rn, value = run(request_session(env, lst, encrypt=False))
    device_pk = env.keys["@device"].encrypt_public
    resp = SessionResponse.from_dict(verify_envelope(value, device_pk))
    assert resp.status == "connected" and resp.session_id == sid
    assert resp.host_keys == [" ".join(env.host_key)]
    assert resp.np_cipher is None and resp.session_aes_key is None
    line = [x for x in env.ak_path.read_text().splitlines() if sid in x]
    assert len(line) == 1 and re.search(rf"sshnp_ephemeral_{sid} until=\d+ owner=@device/pi "
                                        r"holder=\d+$", line[0]), line
    assert 'PermitOpen="localhost:' in line[0] and "no-pty" in line[0]

    sock = accept_relay_side(lst, sid, cn, rn, device_pk)
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=10)
        server_key = t.get_remote_server_key()
        assert [server_key.get_name(), server_key.get_base64()] == env.host_key  # pinned
        pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(resp.ephemeral_private_key))
        t.auth_publickey(env.user, pkey)
        assert t.is_authenticated()
        ch = t.open_channel("direct-tcpip", ("localhost", env.sshd_port), ("127.0.0.1", 1))
        ch.settimeout(10)
        assert ch.recv(64).startswith(b"SSH-2.0-OpenSSH")
        ch.close()
        with pytest.raises(paramiko.ChannelException):  # PermitOpen pins the target
            t.open_channel("direct-tcpip", ("localhost", 1), ("127.0.0.1", 1), timeout=5)
    finally:
        t.close()
        lst.close()
    wait_until(lambda: sid not in env.ak_path.read_text(), 15, "ephemeral key removal")


@pytest.mark.parametrize("offer,cipher", [(None, CIPHER_AES_CTR),
                                          ([CIPHER_CHACHA20_POLY1305], CIPHER_CHACHA20_POLY1305)])
def test_encrypted_session_carries_sshd_bytes(env, offer, cipher):
    session_pub, session_priv = crypto.generate_rsa_keypair()
    lst = listener()
    sid, cn, rn, value = run(request_session(env, lst, encrypt=True, ciphers=offer,
                                             session_pk=session_pub))
    resp = SessionResponse.from_dict(verify_envelope(value, env.keys["@device"].encrypt_public))
    assert resp.np_cipher == cipher
    key, iv = decode_session_secrets(crypto.rsa_decrypt(session_priv, resp.session_aes_key),
                                     crypto.rsa_decrypt(session_priv, resp.session_iv))
    sock = accept_relay_side(lst, sid, cn, rn, env.keys["@device"].encrypt_public)
    c = new_session_cipher(cipher, key, iv, is_client=True)
    try:
        got = b""
        while b"\n" not in got:
            data = sock.recv(4096)
            assert data, "closed before sshd's banner arrived"
            got += c.decrypt(data)
        assert got.startswith(b"SSH-2.0-OpenSSH")
        sock.sendall(c.encrypt(b"SSH-2.0-sshnpd_test\r\n"))
    finally:
        sock.close()
        lst.close()


def test_relay_unreachable_gets_official_error(env):
    dead = listener()
    port = dead.getsockname()[1]
    dead.close()  # nobody listens on port B any more

    class _L:
        def getsockname(self):
            return ("127.0.0.1", port)

    sid, _, _, value = run(request_session(env, _L(), encrypt=False))
    assert value.startswith("Failed to start up the daemon side of the srv socket tunnel : ")
    wait_until(lambda: sid not in env.ak_path.read_text(), 5, "key removal after failure")


def test_local_sshd_down_is_named_and_the_early_relay_socket_closed(env):
    """The session host writes the key and dials sshd and the relay at once: when sshd is
    down the client hears so, the relay connection made meanwhile is closed, and the key
    written meanwhile is removed."""
    dead = listener()
    dead_port = dead.getsockname()[1]
    dead.close()
    env.start_daemon("--local-sshd-port", str(dead_port), "--permit-open",
                     f"localhost:{dead_port}", device="pidown")
    relay = listener()
    sid, cn, rn, value = run(request_session(env, relay, encrypt=False, device="pidown"))
    assert value.startswith("Failed to start up the daemon side of the srv socket tunnel : "
                            f"cannot connect to the local sshd on port {dead_port}"), value
    relay.settimeout(2)
    try:
        sock, _ = relay.accept()
    except TimeoutError:
        sock = None  # never dialled: nothing to close
    if sock is not None:  # dialled meanwhile: its auth line, then closed, nothing pumped
        sock.settimeout(10)
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
        sock.close()
        assert got.endswith(b"\n") and got.count(b"\n") == 1, got
        assert verify_relay_auth(got.rstrip(b"\n"), sid, cn, rn,
                                 env.keys["@device"].encrypt_public)
    relay.close()
    wait_until(lambda: sid not in env.ak_path.read_text(), 5, "key removal after failure")


def session_host_pid(daemon: Proc) -> int:
    """The pid of a daemon's session host, from its own log line."""
    return int(daemon.wait_for(r'session host (\d+) started', 20).group(1))


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_sigterm_hands_sessions_over_and_kill9_leftovers_removed_on_restart(env):
    """docs/decisions/0024-sessions-outlive-daemon.md: a stopped daemon's live session (and
    its key) stays with its session host until it ends; a crash's leftovers do not."""
    ak = AuthorizedKeys(env.ak_path)
    # 1. SIGTERM with a live session: exit 0; the session and its key line stay with the host
    d1 = env.start_daemon("--ephemeral-key-ttl", "300", device="pi2")
    host1 = session_host_pid(d1)
    lst = listener()
    sid, cn, rn, _ = run(request_session(env, lst, encrypt=False, device="pi2"))
    relay_side = accept_relay_side(lst, sid, cn, rn, env.keys["@device"].encrypt_public)
    assert d1.stop(signal.SIGTERM) == 0
    d1.wait_for(r'"event": "sessions_handed_over"', 5)
    assert pid_alive(host1) and sid in ak.ephemeral_sessions()
    # 2. the next daemon leaves that line alone (its holder is alive)...
    d2 = env.start_daemon("--ephemeral-key-ttl", "300", device="pi2")
    host2 = session_host_pid(d2)
    assert host2 != host1 and sid in ak.ephemeral_sessions()
    # ...and when the session ends its host removes the key and exits
    relay_side.close()
    wait_until(lambda: sid not in ak.ephemeral_sessions(), 10, "key removal at session end")
    wait_until(lambda: not pid_alive(host1), 10, "the old session host's exit")
    d1.wait_for(rf'"event": "session_ended".*{sid}', 5)
    # 3. kill -9 of the daemon AND its host with a live session: the line survives the crash...
    sid2, *_ = run(request_session(env, lst, encrypt=False, device="pi2"))
    d2.kill9()
    os.kill(host2, signal.SIGKILL)
    wait_until(lambda: not pid_alive(host2), 5, "the killed host")
    assert sid2 in ak.ephemeral_sessions()
    # 4. ...and the next start removes it, but not the live key of the other daemon (pi)
    other = listener()
    sid_pi, *_ = run(request_session(env, other, encrypt=False))
    d3 = env.start_daemon(device="pi2")
    assert sid2 not in ak.ephemeral_sessions()
    assert sid_pi in ak.ephemeral_sessions()
    other.close()
    d3.wait_for(r'"event": "leftovers_removed"', 5)
    lst.close()


def test_session_host_killed_under_a_live_session_is_named_and_replaced(env):
    """A session host that dies (OOM killer, kill -9) under a live session: the daemon says
    so, removes that session's key, and the next session gets a new host."""
    ak = AuthorizedKeys(env.ak_path)
    d = env.start_daemon("--ephemeral-key-ttl", "300", device="pi3")
    host = session_host_pid(d)
    lst = listener()
    sid, *_ = run(request_session(env, lst, encrypt=False, device="pi3"))
    assert sid in ak.ephemeral_sessions()
    start = len(d.lines)
    os.kill(host, signal.SIGKILL)
    d.wait_for(rf"session host {host} exited \(status -9\): 1 session\(s\) lost", 10, start)
    wait_until(lambda: sid not in ak.ephemeral_sessions(), 10, "the lost session's key removal")
    sid2, _, _, value = run(request_session(env, lst, encrypt=False, device="pi3"))
    assert not value.startswith("Failed"), value
    new_host = int(d.wait_for(r"session host (\d+) started", 10, start).group(1))
    assert new_host != host and sid2 in ak.ephemeral_sessions()
    assert d.stop(signal.SIGTERM) == 0
    os.kill(new_host, signal.SIGTERM)  # ends its session and removes its key
    wait_until(lambda: sid2 not in ak.ephemeral_sessions(), 10, "key removal on SIGTERM")
    lst.close()


def maps_cryptography(pid: int) -> bool:
    return "/cryptography/" in Path(f"/proc/{pid}/maps").read_text()


def test_idle_session_host_is_replaced_by_a_bare_one_that_serves_the_next_session(env):
    """--session-host-idle (decision 0032): a host that loaded its session code and then had
    no session for that long is let go, a fresh one (cryptography not loaded) takes its place
    with nothing lost, and the next session runs there."""
    ak = AuthorizedKeys(env.ak_path)
    d = env.start_daemon("--session-host-idle", "1", device="pi5")
    host = session_host_pid(d)
    assert not maps_cryptography(host)  # a bare interpreter until its first order
    lst = listener()
    sid, cn, rn, value = run(request_session(env, lst, encrypt=False, device="pi5"))
    assert not value.startswith("Failed"), value
    sock = accept_relay_side(lst, sid, cn, rn, env.keys["@device"].encrypt_public)
    assert maps_cryptography(host) and sid in ak.ephemeral_sessions()
    start = len(d.lines)
    sock.close()  # the relay side ends the session: the key goes, the host becomes idle
    d.wait_for(rf"session host {host} idle for 1s: replacing it", 20, start)
    fresh = int(d.wait_for(r"session host (\d+) started", 10, start).group(1))
    wait_until(lambda: not pid_alive(host), 30, "the idle host's exit")
    assert fresh != host and not maps_cryptography(fresh)
    assert sid not in ak.ephemeral_sessions()
    sid2, cn2, rn2, value = run(request_session(env, lst, encrypt=False, device="pi5"))
    assert not value.startswith("Failed"), value
    sock = accept_relay_side(lst, sid2, cn2, rn2, env.keys["@device"].encrypt_public)
    assert sid2 in ak.ephemeral_sessions() and maps_cryptography(fresh)
    assert not [line for line in d.lines[start:] if '"level": "error"' in line]
    sock.close()
    assert d.stop(signal.SIGTERM) == 0
    os.kill(fresh, signal.SIGTERM)
    lst.close()


def test_daemon_survives_garbage_and_atserver_restart(env):
    start = len(env.daemon.lines)

    async def garbage():
        c = await env.client()
        try:
            for v in ("{", "null", "x" * 5000, '{"payload":{},"signature":"","hashingAlgo":'
                      '"sha256","signingAlgo":"rsa2048"}'):
                await c.notify("@device", f"ssh_request.{DEV}.sshnp", v)
            await c.notify("@device", f"sshpublickey.{DEV}.sshnp", "not a key")
            await c.notify("@device", f"npt_request.{DEV}.sshnp", "[]")
        finally:
            await c.close()

    run(garbage())
    env.daemon.wait_for(r'"event": "bad_signature"', 10, start)
    # kill -9 the atServer hosting every atSign, restart it; the daemon must come back
    env.server.proc.kill9()
    env.server = env.plane.start_atserver("srv", restart_of=env.server)

    async def ping() -> str:
        deadline = time.monotonic() + 25
        while True:
            c = await env.client()
            try:
                mon = c.monitor(f"heartbeat.{DEV}.sshnp")
                await mon.wait_ready(10)
                await c.notify("@device", f"ping.{DEV}.sshnp", "ping")
                try:
                    return (await asyncio.wait_for(mon.__anext__(), 3)).value
                except asyncio.TimeoutError:
                    if time.monotonic() > deadline:
                        raise
            finally:
                await c.close()

    assert json.loads(run(ping(), 40))["devicename"] == DEV
    assert env.daemon.popen.poll() is None


# --- replay protection -----------------------------------------------------------------------

async def send_value(env: Env, sid: str, value: str, device: str) -> str:
    """Send an ssh_request value as @client; return the daemon's answer (K6 value)."""
    c = await env.client()
    try:
        mon = c.monitor(f"{sid}.{device}.sshnp@device")
        await mon.wait_ready(10)
        await c.notify("@device", f"ssh_request.{device}.sshnp", value, ttl_ms=10_000)
        n = await asyncio.wait_for(mon.__anext__(), 15)
        assert n.from_atsign == "@device"
        return n.value
    finally:
        await c.close()


def signed(keys: AtKeys, port: int, nonce: str | None) -> tuple[str, str]:
    sid = str(uuid.uuid4())
    req = SshRequest(session_id=sid, host="127.0.0.1", port=port,
                     authenticate_to_rvd=nonce is not None, client_nonce=nonce,
                     rvd_nonce=dart_iso_now() if nonce is not None else None)
    return sid, sign_envelope(req.to_dict(), keys.encrypt_private)


def ephemeral_lines(env: Env) -> set[str]:
    text = env.ak_path.read_text() if env.ak_path.exists() else ""
    return {x for x in text.splitlines() if "sshnp_ephemeral_" in x}


def assert_nothing_happened(env: Env, before: set[str], lst: socket.socket) -> None:
    assert ephemeral_lines(env) - before == set()  # no ephemeral key authorized
    lst.settimeout(0.3)
    with pytest.raises(socket.timeout):
        lst.accept()  # and no session: the daemon never dialled the relay


def test_replay_after_restart_and_kill9_is_refused(env):
    dev = "pi3"
    d1 = env.start_daemon("--ephemeral-key-ttl", "2", device=dev)
    lst = listener()
    sid, value = signed(env.keys["@client"], lst.getsockname()[1], dart_iso_now())
    first = run(send_value(env, sid, value, dev))
    resp = SessionResponse.from_dict(verify_envelope(first, env.keys["@device"].encrypt_public))
    assert resp.status == "connected" and resp.session_id == sid
    sr = SshRequest.from_dict(verify_envelope(value, env.keys["@client"].encrypt_public))
    accept_relay_side(lst, sid, sr.client_nonce, sr.rvd_nonce,
                      env.keys["@device"].encrypt_public).close()  # the first one is served
    wait_until(lambda: sid not in env.ak_path.read_text(), 10, "ephemeral key removal")
    refusal = f"Request refused: session {sid} was already used (a replayed request)"
    for stop in ("sigterm", "kill9"):
        d1.kill9() if stop == "kill9" else d1.stop(signal.SIGTERM)
        d1 = env.start_daemon("--ephemeral-key-ttl", "2", device=dev)
        before = ephemeral_lines(env)
        assert run(send_value(env, sid, value, dev)) == refusal, stop  # the identical value
        assert_nothing_happened(env, before, lst)
        d1.wait_for(r'"event": "session_refused"', 5)
    lst.close()


def test_nonceless_old_future_and_late_requests_are_refused(env):
    """No nonce, 13 h old, 1 h ahead, and a fresh request held up while the device was frozen
    (SIGSTOP: cut off longer than its 2 s window) all get the error reply and nothing else;
    a good request afterwards is still served."""
    dev = "pi4"
    d = env.start_daemon("--request-window", "2", device=dev)
    lst = listener()
    port = lst.getsockname()[1]
    now = time.time()
    from datetime import datetime, timezone

    from noports.npproto import dart_iso

    def at(t: float) -> str:
        return dart_iso(datetime.fromtimestamp(t, timezone.utc))

    cases = [(None, "no clientNonce"), (at(now - 13 * 3600), "behind the device clock"),
             (at(now + 3600), "ahead of the device clock")]
    for nonce, text in cases:
        before = ephemeral_lines(env)
        sid, value = signed(env.keys["@client"], port, nonce)
        answer = run(send_value(env, sid, value, dev))
        assert answer.startswith("Request refused: ") and text in answer, answer
        assert_nothing_happened(env, before, lst)

    # the device is cut off (frozen) while a fresh request is sent; it arrives 4 s late
    before = ephemeral_lines(env)
    sid, value = signed(env.keys["@client"], port, dart_iso_now())

    async def late() -> str:
        c = await env.client()
        try:
            mon = c.monitor(f"{sid}.{dev}.sshnp@device")
            await mon.wait_ready(10)
            os.kill(d.popen.pid, signal.SIGSTOP)
            try:
                await c.notify("@device", f"ssh_request.{dev}.sshnp", value, ttl_ms=10_000)
                await asyncio.sleep(4)
            finally:
                os.kill(d.popen.pid, signal.SIGCONT)
            return (await asyncio.wait_for(mon.__anext__(), 15)).value
        finally:
            await c.close()

    answer = run(late())
    assert answer.startswith("Request refused: its timestamp ") and \
        "behind the device clock (allowed: 2 s either way)" in answer, answer
    assert_nothing_happened(env, before, lst)
    # other requests keep being served
    sid, value = signed(env.keys["@client"], port, dart_iso_now())
    ok = run(send_value(env, sid, value, dev))
    assert SessionResponse.from_dict(verify_envelope(
        ok, env.keys["@device"].encrypt_public)).status == "connected"
    lst.settimeout(10)
    lst.accept()[0].close()
    lst.close()
    assert d.popen.poll() is None


def test_sshnp_user_sees_why_a_late_request_was_refused(env, tmp_path):
    """The real sshnp client, a real srvd: the device is frozen past its 1 s window while
    the request is in flight, so it refuses it as stale; sshnp says so and what to check."""
    env.start_relay()
    dev = "pi5"
    d = env.start_daemon("--request-window", "1", device=dev)
    home = tmp_path / "home"
    home.mkdir()
    client = spawn([sys.executable, "-m", "noports.client.cli", "-f", "@client",
                    "-t", "@device", "-d", dev, "-r", "@relay",
                    "-k", str(env.keys_dir / "@client_key.atKeys"),
                    "--root-domain", env.plane.root, "--ca-file", str(env.plane.tls.ca_cert),
                    "-u", env.user, "--remote-sshd-port", str(env.sshd_port), "-x"],
                   env={"HOME": str(home)})
    try:
        client.wait_for(r"asking relay", timeout=30)
        os.kill(d.popen.pid, signal.SIGSTOP)  # cut off: the request waits for it
        try:
            client.wait_for(r"session request sent", timeout=30)
            time.sleep(2.5)
        finally:
            os.kill(d.popen.pid, signal.SIGCONT)
        rc = client.popen.wait(30)
    finally:
        client.stop()
    err = "\n".join(client.lines)
    assert rc == 7, err  # EXIT_DEVICE_REFUSED
    assert "refused: Request refused: its timestamp " in err, err
    assert "behind the device clock (allowed: 1 s either way)" in err
    assert "check that the client's and the device's clocks are synchronised (NTP)" in err
    assert "compare `date -u` here and on the device" in err  # the hint
    d.wait_for(r'"event": "session_refused"', 5)
