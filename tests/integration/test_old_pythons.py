"""The device and relay side (sshnpd, srvd) on the old Pythons devices still ship: 3.8 and 3.9.

For each interpreter (skipped, with the reason, when pyenv does not have it) a venv is made
once under ~/.cache/noports-test-venvs/device-py3.X (reused while its pins are unchanged)
holding only what sshnpd/srvd import - ``cryptography`` at the oldest version the code
supports on that Python - plus pytest; the project source comes in via PYTHONPATH, not pip
(pyproject says >=3.10 for the whole project). Then:

(a) the daemon's, relay's and protocol's unit tests run under that interpreter;
(b) one real session: sshnpd and srvd under the old Python, our plane, a real OpenSSH sshd and
    sshnp under the suite's Python, encrypted tunnel (AES-CTR), a command runs on the device.

Why these pins: docs/decisions/0023-device-python-3.8.md.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from noports import crypto
from noports.keys.ca import client_context
from noports.keys.onboarding import activate
from tests.harness.plane import Plane, Proc, spawn

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PYENV = Path("/root/.pyenv/versions")
CACHE = Path.home() / ".cache" / "noports-test-venvs"
#: interpreter -> the device-side pins. cryptography: 3.8 gets 3.1, the oldest release whose
#: API the code uses (``backend=`` optional, OpenSSH private keys); Ubuntu 20.04's packaged
#: 2.8 predates it. 3.9 gets 3.3.2, exactly Debian 11's python3-cryptography.
OLD_PYTHONS = {
    "3.8": (PYENV / "3.8.18" / "bin" / "python",
            ["cryptography==3.1", "pytest==8.3.5", "pytest-timeout==2.4.0",
             "hypothesis==6.113.0"]),
    "3.9": (PYENV / "3.9.18" / "bin" / "python",
            ["cryptography==3.3.2", "pytest==8.3.5", "pytest-timeout==2.4.0",
             "hypothesis==6.113.0"]),
}
UNIT_TESTS = ["test_daemon_*.py", "test_srvd_*.py", "test_relay_*.py", "test_npproto_*.py"]
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
CLIENT, DEVICE = "@client_old", "@device_old"


def _venv(version: str) -> Path:
    """The cached venv's python for ``version`` (made on first use, under a lock)."""
    base, pins = OLD_PYTHONS[version]
    if not base.exists():
        pytest.skip(f"Python {version} not installed at {base} (pyenv install it to test it)")
    venv = CACHE / f"device-py{version}"
    stamp = venv / "noports-pins.txt"
    want = "\n".join(pins) + "\n"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"device-py{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == want):
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([str(base), "-m", "venv", str(venv)], check=True, timeout=120)
            res = subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                 "--disable-pip-version-check", "--only-binary", ":all:", *pins],
                capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, f"pip install {pins} for {version}:\n{res.stderr}"
            stamp.write_text(want)
    return venv / "bin" / "python"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module", params=sorted(OLD_PYTHONS))
def old_python(request: pytest.FixtureRequest) -> tuple[str, Path]:
    return request.param, _venv(request.param)


def test_unit_tests_pass_on_old_python(old_python: tuple[str, Path]) -> None:
    version, py = old_python
    res = subprocess.run(
        [str(py), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True, text=True, timeout=30, check=True)
    assert res.stdout.strip() == version
    files = sorted(str(p) for pat in UNIT_TESTS for p in (REPO / "tests" / "unit").glob(pat))
    res = subprocess.run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--tb=short", *files], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"unit tests under Python {version}:\n{res.stdout[-6000:]}"
    assert " passed" in res.stdout.splitlines()[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class World:
    """Plane + sshd shared by both versions; each version gets its own srvd and sshnpd."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.home = base / "home"
        self.keys = self.home / ".atsign" / "keys"
        self.keys.mkdir(parents=True)
        self.procs: list[Proc] = []
        self.plane = Plane(base / "plane")
        self.plane.start_directory()
        atsigns = (CLIENT, DEVICE, *(self.relay_of(v) for v in OLD_PYTHONS))
        secrets = {a: crypto.generate_cram_secret() for a in atsigns}
        self.plane.start_atserver("s1", secrets)
        assert self.plane.directory is not None
        root = (self.plane.directory.host, self.plane.directory.port)
        ctx = client_context(self.plane.tls.ca_cert)
        for atsign, secret in secrets.items():
            activate(atsign, secret, root, ctx, keys_path=self.keyfile(atsign))
        self.ca = str(self.plane.tls.ca_cert)
        self.user = os.environ.get("USER") or subprocess.run(
            ["id", "-un"], capture_output=True, text=True).stdout.strip()
        self._start_sshd()

    @staticmethod
    def relay_of(version: str) -> str:
        return "@relay_py" + version.replace(".", "")

    def keyfile(self, atsign: str) -> Path:
        return self.keys / f"{atsign}_key.atKeys"

    def _start_sshd(self) -> None:
        d = self.base / "sshd"
        d.mkdir()
        for key in (d / "host_ed25519_key", self.home / "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True, timeout=30)
        self.identity = self.home / "id_ed25519"
        self.authorized = d / "authorized_keys"
        self.authorized.write_text((self.home / "id_ed25519.pub").read_text())
        self.authorized.chmod(0o600)
        self.host_pub = d / "host_ed25519_key.pub"
        self.sshd_port = _free_port()
        cfg = d / "sshd_config"
        cfg.write_text(
            f"Port {self.sshd_port}\nListenAddress 127.0.0.1\n"
            f"HostKey {d / 'host_ed25519_key'}\nAuthorizedKeysFile {self.authorized}\n"
            f"PidFile {d / 'sshd.pid'}\nStrictModes no\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nAllowTcpForwarding yes\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        p = spawn([SSHD, "-D", "-e", "-f", str(cfg)])
        self.procs.append(p)
        p.wait_for(r"Server listening on 127\.0\.0\.1 port", timeout=10)

    def start_old(self, version: str, py: Path) -> tuple[Proc, Proc]:
        """srvd and sshnpd (device ``py38``/``py39``) under the old interpreter."""
        env = _env(HOME=str(self.home))
        relay = self.relay_of(version)
        srvd = spawn([str(py), "-m", "noports.relay.srvd_cli", "-a", relay,
                      "-k", str(self.keyfile(relay)), "--root-domain", self.plane.root,
                      "--ca-file", self.ca, "-i", "127.0.0.1", "--bind", "127.0.0.1"], env=env)
        self.procs.append(srvd)
        srvd.wait_for(r"ready", timeout=30)
        dev = "py" + version.replace(".", "")
        sshnpd = spawn([str(py), "-m", "noports.daemon.cli", "-a", DEVICE, "-m", CLIENT,
                        "-d", dev, "-k", str(self.keyfile(DEVICE)),
                        "--root-domain", self.plane.root, "--ca-file", self.ca,
                        "--local-sshd-port", str(self.sshd_port),
                        "--authorized-keys", str(self.authorized),
                        "--sshd-host-keys", str(self.host_pub),
                        "--storage-path", str(self.base / "state" / dev)], env=env)
        self.procs.append(sshnpd)
        sshnpd.wait_for(r"ready", timeout=30)
        return srvd, sshnpd

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.plane.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    if not (Path(SSHD).exists() and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("OpenSSH sshd/ssh/ssh-keygen not installed")
    w = World(tmp_path_factory.mktemp("oldpy"))
    yield w
    w.stop()


def test_real_session_with_sshnpd_and_srvd_on_old_python(world: World,
                                                        old_python: tuple[str, Path]) -> None:
    version, py = old_python
    srvd, sshnpd = world.start_old(version, py)
    dev = "py" + version.replace(".", "")
    res = subprocess.run(
        [sys.executable, "-m", "noports.client.cli", "-f", CLIENT, "-t", DEVICE, "-d", dev,
         "-r", world.relay_of(version), "-k", str(world.keyfile(CLIENT)),
         "--root-domain", world.plane.root, "--ca-file", world.ca, "-i", str(world.identity),
         "-u", world.user, "--remote-sshd-port", str(world.sshd_port),
         "--tunnel-mode", "aes", "echo", f"hello-from-{dev}-$(whoami)"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(world.home)})
    logs = "\nsshnpd:\n" + "\n".join(sshnpd.lines[-30:]) + "\nsrvd:\n" + "\n".join(
        srvd.lines[-30:])
    assert res.returncode == 0, f"rc={res.returncode}\n{res.stderr}{logs}"
    assert res.stdout.strip() == f"hello-from-{dev}-{world.user}", res.stdout + logs
    assert "answered (signature verified)" in res.stderr
    # the daemon and the relay really ran on the old interpreter
    for proc in (sshnpd, srvd):
        exe = os.readlink(f"/proc/{proc.popen.pid}/exe")
        assert Path(exe).resolve() == Path(py).resolve(), exe
