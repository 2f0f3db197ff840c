"""The official Python SDK (`at_client`, PyPI atsdk), unmodified, against our plane.

Shows issue #2's points 1 and 2: PKAM authentication; put/get of public, self and shared keys;
a notification from an atSign on one atServer *process* to an atSign on another, received and
decrypted on the recipient's monitor; and the official demo .atKeys files importing and
authenticating.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from noports import crypto
from noports.keys.atkeys import load_atkeys, save_atkeys
from noports.keys.ca import client_context
from noports.keys.onboarding import activate, import_atkeys
from tests.harness.plane import DEMO_ATKEYS, Plane

pytestmark = pytest.mark.integration
SCENARIO = Path(__file__).with_name("sdk_scenario.py")


@pytest.fixture
def plane(tmp_path):
    p = Plane(tmp_path / "plane")
    p.start_directory()
    yield p
    p.stop()


def _keys_dir(home: Path) -> Path:
    d = home / ".atsign" / "keys"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run_scenario(plane: Plane, home: Path, sender: str, recipient: str) -> dict:
    assert plane.directory is not None
    res = subprocess.run(
        [sys.executable, str(SCENARIO), plane.directory.host, str(plane.directory.port),
         sender, recipient],
        capture_output=True, text=True, timeout=120, env=plane.client_env(home))
    assert res.returncode == 0, f"SDK scenario failed:\n{res.stdout}\n{res.stderr}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_scenario(out: dict, sender: str, recipient: str) -> None:
    assert out["pkam"] is True
    assert out["public"] == "public value"
    assert out["self"] == "self value"
    assert out["shared_by_me"] == "shared value"
    # the recipient reads the shared value through its own server's remote lookup (from/pol)
    assert out["shared_by_other"] == "shared value"
    assert out["public_remote"] == "public value"
    assert out["notify_id"], "notify returned no id"
    assert out["received_from"] == sender
    assert out["received_key"].startswith(f"{recipient}:message")
    assert out["decrypted"] == out["expected"], out["events"]


def test_sdk_across_two_atserver_processes(plane, tmp_path):
    alice_secret, bob_secret = crypto.generate_cram_secret(), crypto.generate_cram_secret()
    s1 = plane.start_atserver("server1", {"@alice": alice_secret})
    s2 = plane.start_atserver("server2", {"@bob": bob_secret})
    assert s1.proc.popen.pid != s2.proc.popen.pid
    home = tmp_path / "home"
    keys_dir = _keys_dir(home)
    ctx = client_context(plane.tls.ca_cert)
    root = (plane.directory.host, plane.directory.port)
    activate("@alice", alice_secret, root, ctx, keys_path=keys_dir / "@alice_key.atKeys")
    activate("@bob", bob_secret, root, ctx, keys_path=keys_dir / "@bob_key.atKeys")
    out = _run_scenario(plane, home, "@alice", "@bob")
    _assert_scenario(out, "@alice", "@bob")


def test_official_demo_atkeys_import_and_authenticate(plane, tmp_path):
    files = sorted(DEMO_ATKEYS.glob("*.atKeys"))
    assert len(files) == 4, f"demo fixtures missing under {DEMO_ATKEYS}"
    secrets = {}
    keys = {}
    for f in files:
        k = load_atkeys(f)
        keys[k.atsign] = (k, f)
        secrets[k.atsign] = crypto.generate_cram_secret()
    names = sorted(secrets)
    # half the atSigns on one process, half on another: cross-process with official keys
    plane.start_atserver("demo1", {a: secrets[a] for a in names[:2]})
    plane.start_atserver("demo2", {a: secrets[a] for a in names[2:]})
    ctx = client_context(plane.tls.ca_cert)
    root = (plane.directory.host, plane.directory.port)
    home = tmp_path / "home"
    keys_dir = _keys_dir(home)
    for atsign, (k, f) in keys.items():
        import_atkeys(k, secrets[atsign], root, ctx)
        shutil.copy(f, keys_dir / f.name)   # the SDK reads the official file itself
    assert "@alice🛠" in keys and "@bob🛠" in keys
    # names[0] is on demo1 and names[2] on demo2: this notify goes server to server;
    # @alice🛠 -> @bob🛠 (both on demo1) covers emoji atSigns within one process.
    sender, recipient = names[0], names[2]
    out = _run_scenario(plane, home, sender, recipient)
    _assert_scenario(out, sender, recipient)
    out = _run_scenario(plane, home, "@alice🛠", "@bob🛠")
    _assert_scenario(out, "@alice🛠", "@bob🛠")


def test_saved_atkeys_are_private_and_sdk_readable(plane, tmp_path):
    secret = crypto.generate_cram_secret()
    plane.start_atserver("server1", {"@carol": secret})
    path = _keys_dir(tmp_path / "home") / "@carol_key.atKeys"
    keys = activate("@carol", secret, (plane.directory.host, plane.directory.port),
                    client_context(plane.tls.ca_cert), keys_path=path)
    assert path.stat().st_mode & 0o777 == 0o600
    again = load_atkeys(path)
    assert again.pkam_private == keys.pkam_private
    save_atkeys(again, path)  # idempotent rewrite keeps 0600
    assert path.stat().st_mode & 0o777 == 0o600


def test_wrong_pkam_is_refused_and_connection_survives(plane):
    from noports.atclient import AtConnection, AtProtocolError, find_secondary

    secret = crypto.generate_cram_secret()
    plane.start_atserver("server1", {"@dave": secret})
    ctx = client_context(plane.tls.ca_cert)
    root = (plane.directory.host, plane.directory.port)
    keys = activate("@dave", secret, root, ctx)
    host, port = find_secondary(*root, "@dave", ctx)
    with AtConnection(host, port, ctx) as conn:
        _, wrong_private = crypto.generate_rsa_keypair()
        with pytest.raises(AtProtocolError) as err:
            conn.authenticate_pkam("@dave", wrong_private)
        assert err.value.code == "AT0401"
        with pytest.raises(AtProtocolError) as err:   # the CRAM secret was deleted on activation
            conn.authenticate_cram("@dave", secret)
        assert err.value.code in {"AT0401", "AT0015"}
        assert conn.command("noop:0") == "ok"          # same connection still serves
        conn.authenticate_pkam("@dave", keys.pkam_private)
        assert conn.command("llookup:public:publickey@dave") == keys.encrypt_public
