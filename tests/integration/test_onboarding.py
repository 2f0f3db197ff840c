"""End to end: `noports plane init/up`, `atsign create/import`, then PKAM with the real SDK.

Every program is the real one, over real TLS on loopback: the `noports` console script starts
the real `atdirectory` and `atserver`; activation goes through the directory lookup and the
atServer; the unmodified Python SDK (`at_client`) then authenticates with the written keys,
trusting only the plane's CA (SSL_CERT_FILE) and finding its keys in $HOME/.atsign/keys.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from noports.atclient import AtConnection
from noports.keys.atkeys import load_atkeys
from noports.keys.ca import client_context
from tests.harness.plane import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
NOPORTS = [str(BIN / "noports")] if (BIN / "noports").exists() else [
    sys.executable, "-m", "noports.admin"]
DEMO = Path(__file__).resolve().parents[1] / "fixtures" / "official-demo-atkeys"
DEMO_FILES = sorted(DEMO.glob("*.atKeys"))

SDK_PKAM = """
import json, sys
from at_client import AtClient
from at_client.common import AtSign
from at_client.connections.address import Address
host, port = sys.argv[1], int(sys.argv[2])
out = {}
for name in sys.argv[3:]:
    # a fresh process-wide root connection per atSign is not needed: one lookup each
    client = AtClient(AtSign(name), root_address=Address(host, port))
    out[name] = client.is_authenticated()
print(json.dumps(out))
"""


def noports(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([*NOPORTS, *args], capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"noports {' '.join(args)} -> {res.returncode}\n"
                             f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def plane(tmp_path_factory):
    base = tmp_path_factory.mktemp("onboarding")
    d = base / "plane"
    port = free_port()
    init = noports("plane", "init", "--dir", str(d), "--directory-port", str(port))
    assert f"export SSL_CERT_FILE={d.resolve() / 'tls' / 'ca.pem'}" in init.stdout
    up = subprocess.Popen([*NOPORTS, "plane", "up", "--dir", str(d)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_lines: list[str] = []
    err_lines: list[str] = []
    ready = threading.Event()

    def pump(stream, sink: list[str], marker: str | None) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            if marker and marker in line:
                ready.set()
        ready.set()  # EOF: the process ended

    threading.Thread(target=pump, args=(up.stdout, out_lines, "press Ctrl-C"),
                     daemon=True).start()
    threading.Thread(target=pump, args=(up.stderr, err_lines, None), daemon=True).start()
    ready.wait(60)
    assert up.poll() is None, "plane up exited:\n" + "\n".join(out_lines + err_lines)
    home = base / "home"
    info = {"dir": d, "port": port, "proc": up, "out": out_lines, "err": err_lines,
            "home": home, "keys": home / ".atsign" / "keys", "ca": d / "tls" / "ca.pem"}
    try:
        yield info
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(20)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait(5)


def sdk_pkam(plane, *atsigns: str) -> dict[str, bool]:
    env = {**os.environ, "HOME": str(plane["home"]), "SSL_CERT_FILE": str(plane["ca"])}
    res = subprocess.run([sys.executable, "-c", SDK_PKAM, "127.0.0.1", str(plane["port"]),
                          *atsigns], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_plane_up_prints_addresses(plane):
    text = "\n".join(plane["out"])
    assert f"directory: 127.0.0.1:{plane['port']}" in text
    status = noports("plane", "status", "--dir", str(plane["dir"]))
    assert "plane up: yes" in status.stdout and "answers" in status.stdout


def test_create_then_sdk_pkam(plane):
    res = noports("atsign", "create", "@alice_np", "--dir", str(plane["dir"]), "--keys-dir",
                  str(plane["keys"]))
    path = plane["keys"] / "@alice_np_key.atKeys"
    assert str(path) in res.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = load_atkeys(path)
    for secret_ish in (keys.pkam_private, keys.encrypt_private):
        assert secret_ish not in res.stdout + res.stderr
    assert sdk_pkam(plane, "@alice_np") == {"@alice_np": True}
    listed = json.loads(noports("atsign", "list", "--dir", str(plane["dir"]), "--json").stdout)
    assert listed["@alice_np"]["directory"] == f"127.0.0.1:{listed['@alice_np']['port']}"

    # the encryption public key is published and readable by anyone
    ctx = client_context(plane["ca"])
    with AtConnection("127.0.0.1", listed["@alice_np"]["port"], ctx) as conn:
        assert conn.command("lookup:publickey@alice_np") == keys.encrypt_public

    # a second create is refused, the keys file is untouched
    again = noports("atsign", "create", "@alice_np", "--dir", str(plane["dir"]), "--keys-dir",
                    str(plane["keys"]), check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert load_atkeys(path) == keys


def test_import_official_demo_files_then_sdk_pkam(plane):
    names = []
    for f in DEMO_FILES:
        noports("atsign", "import", str(f), "--dir", str(plane["dir"]), "--keys-dir",
                str(plane["keys"]))
        names.append(f.name[: -len("_key.atKeys")])
        copied = plane["keys"] / f.name
        assert copied.read_bytes().rstrip(b"\n") == f.read_bytes().rstrip(b"\n")
    assert "@alice🛠" in names
    assert sdk_pkam(plane, *names) == dict.fromkeys(names, True)


def test_remove_then_recreate(plane):
    noports("atsign", "create", "@temp_np", "--dir", str(plane["dir"]), "--keys-dir",
            str(plane["keys"]))
    noports("atsign", "remove", "@temp_np", "--dir", str(plane["dir"]))
    listed = json.loads(noports("atsign", "list", "--dir", str(plane["dir"]), "--json").stdout)
    assert "@temp_np" not in listed
    noports("atsign", "create", "@temp_np", "--dir", str(plane["dir"]), "--keys-dir",
            str(plane["keys"]), "--force")
    assert sdk_pkam(plane, "@temp_np") == {"@temp_np": True}


def test_plane_up_twice_refused(plane):
    res = noports("plane", "up", "--dir", str(plane["dir"]), check=False)
    assert res.returncode == 2 and "already up" in res.stderr


def test_provision_then_activate_on_device(plane, tmp_path: Path):
    """Zero trust: the plane only provisions; the 'device' generates its keys and activates."""
    secret_file = tmp_path / "dev.cram"
    res = noports("atsign", "create", "@device_np", "--dir", str(plane["dir"]),
                  "--cram-secret-out", str(secret_file))
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip()
    assert secret not in res.stdout + res.stderr
    assert not (plane["keys"] / "@device_np_key.atKeys").exists()
    device_keys = tmp_path / "device-keys"
    noports("atsign", "activate", "@device_np", "--root", f"127.0.0.1:{plane['port']}",
            "--ca", str(plane["ca"]), "--cram-secret-file", str(secret_file),
            "--keys-dir", str(device_keys))
    path = device_keys / "@device_np_key.atKeys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # the secret is single-use: activating again fails with a clear message
    again = noports("atsign", "activate", "@device_np", "--root", f"127.0.0.1:{plane['port']}",
                    "--ca", str(plane["ca"]), "--cram-secret-file", str(secret_file),
                    "--keys-dir", str(tmp_path / "other"), check=False)
    assert again.returncode == 2 and "already activated" in again.stderr
    (plane["keys"] / path.name).write_bytes(path.read_bytes())
    assert sdk_pkam(plane, "@device_np") == {"@device_np": True}


def test_sigterm_stops_everything(plane):
    """Last test of the module: SIGTERM stops plane up and both servers."""
    up = plane["proc"]
    up.send_signal(signal.SIGTERM)
    assert up.wait(30) == 0
    time.sleep(0.2)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", plane["port"]), timeout=2).close()
    assert not (plane["dir"] / "run.json").exists()
    status = noports("plane", "status", "--dir", str(plane["dir"]), check=False)
    assert status.returncode == 1 and "plane up: no" in status.stdout
