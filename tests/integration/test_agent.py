"""The controller agent as a server (docs/agent.md): real plane, relay, sshnpd and OpenSSH
(tests/harness/world.py), the agent started on demand by ``sshnp-connect`` under ``ssh -o
ProxyUseFdpass=yes``.

* both tunnel modes work through it, with the pinned host key (StrictHostKeyChecking=yes
  against the known_hosts the agent wrote), and a failed set-up reaches ssh's stderr as the
  client's own ``sshnp: error: <step>: ...`` line;
* hostile input: a garbage request, an over-long one, bad sshnp arguments and a silent
  connection each get an error (or time out) while other tunnels keep being set up and the
  same agent keeps serving;
* as root: another uid that gets past the directory (permissions loosened on purpose) is
  refused by the SO_PEERCRED check and receives nothing.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from noports.agent import protocol as proto
from noports.agent.connect import socket_address
from tests.harness.topology import SSHD
from tests.harness.world import PY, World, noports_world

CONNECT = str(Path(PY).parent / "sshnp-connect")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not (shutil.which("ssh") and Path(SSHD).exists()),
                       reason="OpenSSH not installed"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("agent")
    with noports_world(base, 1) as w:
        w.agent_dir = base / "ag"  # type: ignore[attr-defined]
        try:
            yield w
        finally:
            _stop_agent(w)


def _stop_agent(w: World) -> None:
    try:
        pid = _stats(w)["pid"]
    except (OSError, AssertionError, KeyError, ValueError):
        return
    os.kill(pid, 15)


def _ssh(w: World, *, mode: str = "aes", command: str = "echo tunnel-ok",
         relay: str | None = None) -> subprocess.CompletedProcess:
    kh = w.base / f"kh-{mode}"
    argv = w.sshnp_argv(1, "--known-hosts", str(kh), mode=mode)
    argv = [CONNECT, "--agent-dir", str(w.agent_dir), "--agent-idle", "120",  # type: ignore
            *argv[3:]]
    if relay:
        argv[argv.index("-r") + 1] = relay
    opts = w.proxy_options(1, mode=mode, known_hosts=kh)
    opts[opts.index("-o") + 1] = "ProxyCommand=" + shlex.join(argv)
    return subprocess.run(["ssh", *opts, "-o", "ProxyUseFdpass=yes", w.proxy_target(1),
                           command], capture_output=True, text=True, timeout=90,
                          env=w.client_env(), stdin=subprocess.DEVNULL)


def _raw(w: World, data: bytes, *, read: bool = True) -> socket.socket | list[proto.Reply]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(socket_address(str(w.agent_dir)))  # type: ignore[attr-defined]
    s.sendall(data)
    if not read:
        return s
    buf, out = proto.LineBuffer(), []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += [proto.parse_reply(ln) for ln in buf.feed(chunk)]
    s.close()
    return out


def _stats(w: World) -> dict:
    r = subprocess.run([CONNECT, "--agent-stats", "--agent-dir", str(w.agent_dir)],  # type: ignore
                       capture_output=True, text=True, timeout=30, env=w.client_env())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_both_modes_pinned_and_errors_name_the_step(world: World) -> None:
    for mode in ("aes", "ssh"):
        r = _ssh(world, mode=mode)
        assert r.returncode == 0 and r.stdout.strip() == "tunnel-ok", (mode, r.stderr)
        assert "np_dev1/dev1" in (world.base / f"kh-{mode}").read_text()  # pinned by the agent
    bad = _ssh(world, relay="@np_norelay")
    assert bad.returncode == 255
    assert "sshnp: error: relay: " in bad.stderr and "@np_norelay" in bad.stderr, bad.stderr
    st = _stats(world)
    assert st["sessions"] == 2
    # our sshnpd sealed the aes session's key to its X25519 key, not RSA (decision 0029)
    assert st["key_exchanges"] == {"x25519": 1}, st


def test_bad_huge_silent_requests_do_not_stop_the_others(world: World) -> None:
    pid = _stats(world)["pid"]
    silent = _raw(world, b"", read=False)  # holds a connection without a request
    garbage = _raw(world, b"GET / HTTP/1.0\r\n\r\n")
    assert garbage[-1].kind == "error" and "bad request: not a JSON line" in garbage[-1].text
    huge = _raw(world, b"x" * (proto.MAX_LINE + 10))
    assert huge[-1].kind == "error" and "longer than" in huge[-1].text
    args = _raw(world, proto.encode_request("open", ["-f", "@np_client"], "/"))
    assert args[-1].kind == "error" and args[-1].text.startswith("arguments: -t/--to")
    assert args[-1].exit_code == 2
    helped = _raw(world, proto.encode_request("open", ["--help"], "/"))  # argparse would exit
    assert helped[-1].kind == "error" and "sshnp-connect --help" in helped[-1].text
    r = _ssh(world)  # while the silent one is still connected
    assert r.returncode == 0 and r.stdout.strip() == "tunnel-ok", r.stderr
    assert isinstance(silent, socket.socket)
    silent.close()
    st = _stats(world)
    assert st["pid"] == pid and st["failures"] >= 3


def _request(path: Path, data: bytes) -> list[proto.Reply]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    s.sendall(data)
    buf, out = proto.LineBuffer(), []
    while chunk := s.recv(65536):
        out += [proto.parse_reply(ln) for ln in buf.feed(chunk)]
    s.close()
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_another_uid_is_refused_by_peer_credentials() -> None:
    """Its own agent, in a directory another uid can reach once loosened (pytest's tmp is
    root-only all the way up)."""
    base = Path(tempfile.mkdtemp(prefix="np-agent-"))
    base.chmod(0o711)
    d = base / "ag"
    agent = subprocess.Popen([PY, "-m", "noports.agent", "--dir", str(d), "--idle", "60"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        sock = d / "agent.sock"
        deadline = time.monotonic() + 30
        while not sock.exists() and agent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), agent.stderr.read() if agent.poll() is not None else "no socket"
        d.chmod(0o711)
        sock.chmod(0o666)
        child = [sys.executable, "-c", (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(20)\n"
            f"s.connect({str(sock)!r})\n"
            "try:\n"  # the agent may close before our request is written: a broken pipe
            "    s.sendall(b'{\"v\": 1, \"op\": \"stats\"}\\n')\n"
            "    sys.stdout.write(repr(s.recv(65536)))\n"
            "except (ConnectionResetError, BrokenPipeError):\n"
            "    sys.stdout.write('reset')\n")]
        r = subprocess.run(child, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert r.stdout in ("b''", "reset")  # nothing, not even an error
        after = _request(sock, proto.encode_request("stats"))  # the owner is still served
        assert after[-1].kind == "ok" and after[-1].info["refused"] == 1
    finally:
        agent.terminate()
        agent.wait(20)
        shutil.rmtree(base, ignore_errors=True)


def test_sshnp_stdio_with_fdpass_starts_the_agent_on_demand(world: World) -> None:
    """Plain OpenSSH users: ``sshnp --stdio`` under ``ProxyUseFdpass=yes`` goes through the
    per-user agent ($SSHNP_AGENT_DIR; started if not running) and leaves no process per
    host; without ProxyUseFdpass it stays today's per-host client (the rest of the suite)."""
    before = _stats(world)["sessions"]
    kh = world.base / "kh-stdio"
    opts = world.proxy_options(1, known_hosts=kh)  # ProxyCommand=python -m ...cli --stdio
    r = subprocess.run(["ssh", *opts, "-o", "ProxyUseFdpass=yes", world.proxy_target(1),
                        "echo tunnel-ok"], capture_output=True, text=True, timeout=90,
                       env={**world.client_env(), "SSHNP_AGENT_DIR": str(world.agent_dir)},
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout.strip() == "tunnel-ok", r.stderr
    assert _stats(world)["sessions"] == before + 1  # the agent set it up, not a client
    assert "np_dev1/dev1" in kh.read_text()
