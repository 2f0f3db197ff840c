"""sshnp end to end on loopback: real plane, real srvd, real sshnpd, REAL OpenSSH sshd/ssh.

Every component is the real program (subprocesses): atdirectory + atserver (tests.harness.plane),
``srvd``, ``sshnpd``, ``/usr/sbin/sshd`` on a high loopback port with a throw-away config,
and ``sshnp`` itself run as ``python -m noports.client.cli``. Covered: exec mode in both
tunnel modes, ``-x`` (background tunnel + the printed command), ``--stdio`` as the
ProxyCommand of a plain ``ssh`` with the pinned known_hosts, relay fall-back, and failures
(unknown device, bad relay) giving one-line errors and the documented exit codes.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.plane import Plane, Proc, spawn
from tests.harness.sshd import loopback_sshd

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists())
                       or not shutil.which("ssh"), reason="OpenSSH sshd/ssh not installed"),
]

CLIENT, DEVICE, RELAY, RELAY2 = "@client_e2e", "@device_e2e", "@relay_e2e", "@relay2_e2e"
DEV = "box1"
PY = sys.executable


class Env:
    """Plane + srvd + sshd + sshnpd, and a way to run sshnp against them."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "home"
        self.keys = self.home / ".atsign" / "keys"
        self.keys.mkdir(parents=True)
        self.procs: list[Proc] = []
        self.plane = Plane(base / "plane", keys_dir=self.keys)
        self.plane.populate({"s1": [CLIENT, DEVICE, RELAY, RELAY2]})
        self.root = self.plane.root
        self.ca = str(self.plane.tls.ca_cert)
        self.user = os.environ.get("USER") or subprocess.run(
            ["id", "-un"], capture_output=True, text=True).stdout.strip()
        self._start_sshd()
        self.relay = self._start_srvd(RELAY)
        self.daemon = self._start_sshnpd()

    def keyfile(self, atsign: str) -> Path:
        return self.plane.keys_file(atsign)

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home), "PYTHONUNBUFFERED": "1"}

    def _start_sshd(self) -> None:
        sshd = loopback_sshd(self.base, self.home)
        self.sshd, self.sshd_port, self.identity = sshd.proc, sshd.port, sshd.identity
        self.authorized, self.host_pub = sshd.authorized_keys, sshd.host_pub
        self.procs.append(self.sshd)

    def _start_srvd(self, atsign: str) -> Proc:
        p = spawn([PY, "-m", "noports.relay.srvd_cli", "-a", atsign, "-k",
                   str(self.keyfile(atsign)), "--root-domain", self.root, "--ca-file", self.ca,
                   "-i", "127.0.0.1", "--bind", "127.0.0.1"], env=self.env())
        self.procs.append(p)
        p.wait_for(r"ready", timeout=20)
        return p

    def _start_sshnpd(self) -> Proc:
        p = spawn([PY, "-m", "noports.daemon.cli", "-a", DEVICE, "-m", CLIENT, "-d", DEV,
                   "-k", str(self.keyfile(DEVICE)), "--root-domain", self.root, "--ca-file",
                   self.ca, "--local-sshd-port", str(self.sshd_port), "--permit-open",
                   f"localhost:{self.sshd_port}", "--authorized-keys",
                   str(self.authorized), "--sshd-host-keys", str(self.host_pub), "-v"],
                  env=self.env())
        self.procs.append(p)
        p.wait_for(r"ready", timeout=20)
        return p

    def sshnp_args(self, *extra: str, relays: str = RELAY, device: str = DEV) -> list[str]:
        return [PY, "-m", "noports.client.cli", "-f", CLIENT, "-t", DEVICE, "-d", device,
                "-r", relays, "-k", str(self.keyfile(CLIENT)), "--root-domain", self.root,
                "--ca-file", self.ca, "-i", str(self.identity), "-u", self.user,
                "--remote-sshd-port", str(self.sshd_port), *extra]

    def sshnp(self, *extra: str, timeout: float = 40, **kw: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.sshnp_args(*extra, **kw), capture_output=True, text=True,
                              timeout=timeout, env=self.env(), stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.plane.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("sshnp"))
    yield e
    e.stop()


def _ok(res: subprocess.CompletedProcess, env: Env) -> None:
    assert res.returncode == 0, (f"rc={res.returncode}\nstdout:{res.stdout}\nstderr:{res.stderr}"
                                 f"\nsshnpd:\n" + "\n".join(env.daemon.lines[-30:]))


@pytest.mark.parametrize("mode", ["aes", "ssh"])
def test_exec_runs_remote_command(env: Env, mode: str) -> None:
    res = env.sshnp("--tunnel-mode", mode, "echo", "hello-$(whoami)")
    _ok(res, env)
    assert res.stdout.strip() == f"hello-{env.user}"
    # progress lines name the steps; the pinned key went to the per-device known_hosts
    assert "relay @relay_e2e opened" in res.stderr
    assert "answered (signature verified)" in res.stderr
    kh = env.home / ".atsign" / "sshnp" / "known_hosts.d" / "device_e2e__box1"
    assert kh.read_text().split()[1:3] == env.host_pub.read_text().split()[:2]


def test_exec_quiet_and_exit_code(env: Env) -> None:
    res = env.sshnp("-q", "exit", "7")
    assert res.returncode == 7, res.stderr
    assert "sshnp [" not in res.stderr


@pytest.mark.parametrize("mode", ["aes", "ssh"])
def test_print_command_keeps_tunnel_in_background(env: Env, mode: str) -> None:
    res = env.sshnp("-x", "--tunnel-mode", mode, timeout=30)
    _ok(res, env)
    argv = shlex.split(res.stdout.strip())
    assert argv[0].endswith("ssh") and f"{env.user}@127.0.0.1" in argv
    assert "StrictHostKeyChecking=yes" in argv
    out = subprocess.run([*argv, "-o", "BatchMode=yes", "echo", "via-x"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "via-x"


@pytest.mark.parametrize("mode", ["aes", "ssh"])
def test_stdio_as_proxycommand(env: Env, mode: str, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    proxy = shlex.join(env.sshnp_args("--stdio", "-q", "--tunnel-mode", mode,
                                      "--known-hosts", str(kh)))
    alias = "device_e2e/box1"
    cmd = ["ssh", "-F", "/dev/null", "-o", f"ProxyCommand={proxy}", "-o",
           f"HostKeyAlias={alias}", "-o", f"UserKnownHostsFile={kh}", "-o",
           "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-i", str(env.identity),
           "-o", "IdentitiesOnly=yes", f"{env.user}@{alias.replace('/', '.')}", "echo",
           "proxied"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=40, env=env.env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "proxied"
    assert alias in kh.read_text()


def test_stdio_parallel_starts(env: Env, tmp_path: Path) -> None:
    """Ansible forks: several ProxyCommands at once, one shared known_hosts file."""
    kh = tmp_path / "known_hosts"
    proxy = shlex.join(env.sshnp_args("--stdio", "-q", "--known-hosts", str(kh)))
    cmd = ["ssh", "-F", "/dev/null", "-o", f"ProxyCommand={proxy}", "-o",
           "HostKeyAlias=device_e2e/box1", "-o", f"UserKnownHostsFile={kh}", "-o",
           "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-i", str(env.identity),
           f"{env.user}@box1", "echo"]
    procs = [subprocess.Popen([*cmd, f"n{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env.env()) for i in range(4)]
    outs = [p.communicate(timeout=50) for p in procs]
    for i, (p, (o, e)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, e
        assert o.strip() == f"n{i}"
    assert len(kh.read_text().splitlines()) == 1


def test_relay_fallback(env: Env) -> None:
    res = env.sshnp("--relay-timeout", "1", "--relay-select", "ordered", "echo", "fallback",
                    relays=f"{RELAY2},{RELAY}")
    _ok(res, env)
    assert res.stdout.strip() == "fallback"
    assert "relay @relay2_e2e did not answer within 1s; trying the next relay" in res.stderr


def test_unknown_device_times_out_with_hint(env: Env) -> None:
    res = env.sshnp("--daemon-timeout", "2", "true", device="nosuchdev", timeout=30)
    assert res.returncode == 6, res.stderr
    assert "Traceback" not in res.stderr
    assert "did not answer within 2s" in res.stderr and "is sshnpd running" in res.stderr


def test_no_relay_answer(env: Env) -> None:
    res = env.sshnp("--relay-timeout", "1", "true", relays=RELAY2, timeout=30)
    assert res.returncode == 5, res.stderr
    assert "relay @relay2_e2e did not answer within 1s" in res.stderr
    assert "Traceback" not in res.stderr


def test_setup_is_fast(env: Env) -> None:
    """Command start -> remote output; printed (p50 target 0.5 s on loopback), loosely bound."""
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        res = env.sshnp("-q", "echo", "t")
        times.append(time.monotonic() - t0)
        _ok(res, env)
    times.sort()
    print(f"\nsshnp exec p50 {times[1]:.3f}s (runs {', '.join(f'{t:.3f}' for t in times)})")
    assert times[1] < 5.0


def test_list_devices(env: Env) -> None:
    res = subprocess.run([PY, "-m", "noports.client.cli", "-f", CLIENT, "-k",
                          str(env.keyfile(CLIENT)), "--root-domain", env.root, "--ca-file",
                          env.ca, "--list-devices", "-q"], capture_output=True, text=True,
                         timeout=30, env=env.env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\t")[:2] == [f"{DEV}{DEVICE}", "active"]
