"""Official peers against our programs (docs/official-peers.md).

1. at_c (the official C SDK, used by the C sshnpd and by embedded clients) logs in to our
   atServer: its exact byte sequence is replayed over real TLS, one ``sendall`` per write
   at_c makes (``connection.c`` connect, ``atclient_pkam_authenticate``): read the ``@``
   prompt, ``\\r\\n`` then one read, ``from:<atsign without @>\\r\\n``, ``pkam:<sig>\\r\\n``
   with the challenge signed SHA256withRSA by the official demo .atKeys. The root lookup is
   replayed the same way against our directory. Hostile: an empty-line flood before auth is
   cut at the limit and other clients are still served.
2. ``sshnp`` against a daemon that answers as official daemons do (no ``hostKeys``, no
   ``npCipher``, ``ephemeralPrivateKey: null``): our sshnpd with its hidden, test-only
   ``--official-reply`` switch. One test per output mode (exec with ``-u`` and without it,
   ``-x``, ``--stdio``, fixed ``-l`` local port, ``--tunnel-mode ssh`` refused). npt against
   the same kind of daemon (the AES-CTR path): tests/integration/test_npt.py.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from test_client_e2e import CLIENT, DEV, DEVICE, PY, Env

from noports import crypto
from noports.atserver.session import MAX_EMPTY_LINES_UNAUTH
from noports.keys.atkeys import load_atkeys
from noports.keys.ca import client_context
from noports.keys.onboarding import activate
from tests.harness.plane import DEMO_ATKEYS, Plane, Proc, free_port, spawn

pytestmark = [pytest.mark.integration]

ALICE = "@alice\U0001f6e0"  # an official demo atSign (emoji U+1F6E0), with its .atKeys
EMPTY_REPLY = b"error:AT0003-Exception: invalid command\n@"


# --- 1. at_c's login, byte for byte -------------------------------------------------------

@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    p = Plane(tmp_path_factory.mktemp("atc"))
    p.start_directory()
    secret = crypto.generate_cram_secret()
    p.start_atserver("s1", {ALICE: secret})
    ctx = client_context(p.tls.ca_cert)
    assert p.directory is not None
    keys = load_atkeys(DEMO_ATKEYS / f"{ALICE}_key.atKeys")
    activate(ALICE, secret, (p.directory.host, p.directory.port), ctx, keys=keys)
    yield p, ctx, keys
    p.stop()


def _tls(ctx: ssl.SSLContext, host: str, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=host)


def _read_reply(s: ssl.SSLSocket) -> bytes:
    """at_c's atclient_connection_send read loop: recv until a chunk holds `\\n`."""
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(4096)
        assert chunk, f"connection closed; got {buf!r}"
        buf += chunk
    return buf


def _connect_like_atc(ctx: ssl.SSLContext, host: str, port: int) -> tuple[ssl.SSLSocket, bytes]:
    """at_c connection.c: one read (the prompt), one write `\\r\\n`, ONE read (the reply)."""
    s = _tls(ctx, host, port)
    assert s.recv(256) == b"@"
    s.sendall(b"\r\n")
    first = s.recv(256)
    assert first.endswith(b"@"), f"reply not framed in one read: {first!r}"
    return s, first


def _atc_login(plane, pkam_line) -> tuple[bytes, bytes, bytes]:
    p, ctx, keys = plane
    d = p.directory
    bare = ALICE[1:].encode()
    root, first = _connect_like_atc(ctx, d.host, d.port)
    with root:
        assert first == b"null\r\n@"
        root.sendall(bare + b"\r\n")
        addr = _read_reply(root).split(b"\r\n")[0].split(b"\n")[0].decode()
    host, port = addr.rsplit(":", 1)
    s, empty = _connect_like_atc(ctx, host, int(port))
    with s:
        s.sendall(b"from:" + bare + b"\r\n")
        challenge = _read_reply(s)
        assert challenge.startswith(b"data:") and challenge.endswith(b"\n@"), challenge
        sig = crypto.sign(keys.pkam_private, challenge[5:].split(b"\n")[0])
        s.sendall(pkam_line(sig).encode() + b"\r\n")
        done = _read_reply(s)
        if done.startswith(b"data:success"):
            s.sendall(b"llookup:public:publickey" + ALICE.encode() + b"\r\n")
            assert _read_reply(s).startswith(b"data:")  # a normal owner session follows
    return empty, challenge, done


def test_atc_login_replay_legacy_pkam(plane) -> None:
    empty, _challenge, done = _atc_login(plane, lambda sig: f"pkam:{sig}")
    assert empty == EMPTY_REPLY
    assert done == f"data:success\n{ALICE}@".encode()


def test_atc_login_replay_pkam_with_algorithms(plane) -> None:
    """Current at_c: `pkam:signingAlgo:rsa2048:hashingAlgo:sha256:<sig>`."""
    empty, _c, done = _atc_login(
        plane, lambda sig: f"pkam:signingAlgo:rsa2048:hashingAlgo:sha256:{sig}")
    assert empty == EMPTY_REPLY
    assert done == f"data:success\n{ALICE}@".encode()


def test_atc_login_with_a_wrong_signature_is_refused(plane) -> None:
    bad = crypto.b64(b"\x00" * 256)
    empty, _c, done = _atc_login(plane, lambda _sig: f"pkam:{bad}")
    assert empty == EMPTY_REPLY
    assert done.startswith(b"error:AT0401") and done.endswith(b"\n@"), done


def test_empty_line_flood_is_cut_and_others_are_served(plane) -> None:
    p, ctx, _keys = plane
    port = p.servers[0].ports[ALICE.lower()]
    with _tls(ctx, "127.0.0.1", port) as s:
        assert s.recv(16) == b"@"
        s.sendall(b"\r\n" * 20_000)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.count(EMPTY_REPLY) == MAX_EMPTY_LINES_UNAUTH
    assert got.endswith(f"error:AT0003-Exception: more than {MAX_EMPTY_LINES_UNAUTH} empty "
                        "lines before authentication; closing\n@".encode())
    assert len(got) < 1024  # 40 KB in, under 1 KB out: no amplification
    empty, _c, done = _atc_login(plane, lambda sig: f"pkam:{sig}")
    assert empty == EMPTY_REPLY and done.startswith(b"data:success")


# --- 2. sshnp against a daemon that replies as official daemons do ------------------------

class OfficialReplyEnv(Env):
    """test_client_e2e's world (plane, srvd, real sshd; sshnp always given -u), with sshnpd
    started with its test-only --test-official-reply."""

    def _start_sshnpd(self) -> Proc:
        p = spawn([PY, "-m", "noports.daemon.cli", "-a", DEVICE, "-m", CLIENT, "-d", DEV,
                   "-k", str(self.keyfile(DEVICE)), "--root-domain", self.root, "--ca-file",
                   self.ca, "--local-sshd-port", str(self.sshd_port), "--permit-open",
                   f"localhost:{self.sshd_port}", "--authorized-keys", str(self.authorized),
                   "--sshd-host-keys", str(self.host_pub), "-v", "--test-official-reply"],
                  env=self.env())
        self.procs.append(p)
        p.wait_for(r"ready", timeout=20)
        return p


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    e = OfficialReplyEnv(tmp_path_factory.mktemp("official"))
    yield e
    e.stop()


def _ok(res: subprocess.CompletedProcess, env: Env) -> None:
    assert res.returncode == 0, (f"rc={res.returncode}\nstdout:{res.stdout}\nstderr:{res.stderr}"
                                 "\nsshnpd:\n" + "\n".join(env.daemon.lines[-30:]))


def _official_progress(stderr: str) -> None:
    """What the user is told about a daemon without our additions."""
    assert "sent no host keys (official daemon?); ssh will trust the device's host key on " \
           "first use" in stderr
    assert "tunnel ready (aes/aes-256-ctr)" in stderr  # no npCipher: AES-256-CTR


def _tofu(kh: Path) -> list[str]:
    """ssh's own (trust on first use) known_hosts; tests never touch the user's real one."""
    return ["-o", f"UserKnownHostsFile={kh}"]


def _trusted(kh: Path, official: OfficialReplyEnv) -> bool:
    found = subprocess.run(["ssh-keygen", "-F", "device_e2e/box1", "-f", str(kh)],
                           capture_output=True, text=True)
    return official.host_pub.read_text().split()[1] in found.stdout


def test_exec_with_user_restarts_ssh_unpinned(official: OfficialReplyEnv, tmp_path: Path) -> None:
    """The issue: -u starts ssh early; no hostKeys -> restarted on the same port."""
    kh = tmp_path / "known_hosts"
    res = official.sshnp(*_tofu(kh), "echo", "hello-$(whoami)")
    _ok(res, official)
    assert res.stdout.strip() == f"hello-{official.user}"
    _official_progress(res.stderr)
    assert "device sent no host keys: restarting ssh without pinning" in res.stderr
    assert _trusted(kh, official)  # accepted on first use under the HostKeyAlias
    # sshnp offered twin keys and the daemon answered as today's official daemons do
    # (aesKeyC2D/ivC2D + aesKeyD2C/ivD2C): the session above ran with a key per direction
    assert any("twin keys" in ln for ln in official.daemon.lines), official.daemon.lines[-20:]


def test_exec_with_user_on_a_fixed_local_port(official: OfficialReplyEnv,
                                              tmp_path: Path) -> None:
    port = free_port()
    kh = tmp_path / "known_hosts"
    for run in range(2):  # the second run re-binds right after the first closed the port
        res = official.sshnp(*_tofu(kh), "-l", str(port), "echo", f"fixed-{run}")
        _ok(res, official)
        assert res.stdout.strip() == f"fixed-{run}"
        assert f"connected through 127.0.0.1:{port}" in res.stderr


def test_print_command_mode(official: OfficialReplyEnv, tmp_path: Path) -> None:
    res = official.sshnp("-x", timeout=30)
    _ok(res, official)
    _official_progress(res.stderr)
    argv = shlex.split(res.stdout.strip())
    assert argv[0].endswith("ssh") and f"{official.user}@127.0.0.1" in argv
    out = subprocess.run([*argv, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                          "-o", f"UserKnownHostsFile={tmp_path / 'kh'}", "echo", "via-x"],
                         capture_output=True, text=True, timeout=20, env=official.env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "via-x"


def test_stdio_as_proxycommand(official: OfficialReplyEnv, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    proxy = shlex.join(official.sshnp_args("--stdio", "-q", "--known-hosts", str(kh)))
    alias = "device_e2e/box1"
    cmd = ["ssh", "-F", "/dev/null", "-o", f"ProxyCommand={proxy}", "-o",
           f"HostKeyAlias={alias}", "-o", f"UserKnownHostsFile={kh}", "-o",
           "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes", "-i",
           str(official.identity), "-o", "IdentitiesOnly=yes", f"{official.user}@box1", "echo",
           "proxied"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=40, env=official.env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "proxied"
    # nothing was pinned by sshnp: the key in known_hosts is the one ssh accepted on first use
    assert kh.read_text().split()[1:3] == official.host_pub.read_text().split()[:2]


def test_agent_tunnel_to_an_official_daemon_uses_rsa(official: OfficialReplyEnv,
                                                     tmp_path: Path) -> None:
    """Through the agent (sshnp-connect, ProxyUseFdpass): the official-style daemon ignores
    our npX25519 and encrypts to the (reused) RSA key; the agent counts an rsa2048 session
    (decision 0029)."""
    kh, agent_dir = tmp_path / "known_hosts", tmp_path / "ag"
    connect = str(Path(PY).parent / "sshnp-connect")
    proxy = shlex.join([connect, "--agent-dir", str(agent_dir), "--agent-idle", "30",
                        *official.sshnp_args("-q", "--known-hosts", str(kh))[3:]])
    cmd = ["ssh", "-F", "/dev/null", "-o", f"ProxyCommand={proxy}", "-o", "ProxyUseFdpass=yes",
           "-o", "HostKeyAlias=device_e2e/box1", "-o", f"UserKnownHostsFile={kh}", "-o",
           "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes", "-i",
           str(official.identity), "-o", "IdentitiesOnly=yes", f"{official.user}@box1", "echo",
           "via-agent"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=official.env())
    stats = subprocess.run([connect, "--agent-stats", "--agent-dir", str(agent_dir)],
                           capture_output=True, text=True, timeout=30, env=official.env())
    if stats.returncode == 0:
        os.kill(json.loads(stats.stdout)["pid"], signal.SIGTERM)
    assert out.returncode == 0 and out.stdout.strip() == "via-agent", out.stderr
    assert json.loads(stats.stdout)["key_exchanges"] == {"rsa2048": 1}, stats.stdout


def test_ssh_tunnel_mode_is_refused_with_the_way_out(official: OfficialReplyEnv) -> None:
    res = official.sshnp("--tunnel-mode", "ssh", "true")
    assert res.returncode != 0
    assert "sent no host keys to pin, so the outer SSH cannot verify the device" in res.stderr
    assert "use --tunnel-mode aes with this daemon" in res.stderr
    assert "Traceback" not in res.stderr


def test_exec_without_user_uses_the_shared_username(official: OfficialReplyEnv,
                                                    tmp_path: Path) -> None:
    """Without -u, ssh starts only once the session exists, as the user the device shares
    (official daemons share it too): no early ssh, so nothing to restart."""
    argv = official.sshnp_args(*_tofu(tmp_path / "known_hosts"), "echo", "shared-$(whoami)")
    i = argv.index("-u")
    del argv[i:i + 2]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=40, env=official.env(),
                         stdin=subprocess.DEVNULL)
    _ok(res, official)
    assert res.stdout.strip() == f"shared-{official.user}"
    _official_progress(res.stderr)
    assert "restarting ssh" not in res.stderr
