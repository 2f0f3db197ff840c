"""Device keys with one-time codes, end to end, and what a revocation reaches.

Every program is the real one (noports_harness: atdirectory, atservers, srvd, sshnpd, sshnp,
OpenSSH over real TLS): the operator issues a code with `noports enroll otp`, the device makes
its own key with `noports enroll request` (the CRAM secret and the operator's .atKeys never go
to it), the operator approves; sshnpd then runs on the device key alone. Revoking it ends the
device's atServer connections at once, refuses its pkam, and srvd ends the live ssh session.
Hostile: wrong/huge/replayed codes, guessing, while other clients keep being served.
Figures (revoke -> connection closed, revoke -> session ended) are printed, not asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from noports.atclient import AtConnection, AtProtocolError, find_secondary
from noports.keys.atkeys import load_atkeys
from noports.keys.ca import client_context
from tests.harness.sshd import SSHD
from tests.harness.world import CLIENT, PY, device_atsign, noports_world

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (shutil.which("ssh") and Path(SSHD).exists()),
                       reason="OpenSSH not installed"),
]

DEV = device_atsign(1)
FIGURES: list[str] = []


def noports(*args: str, stdin: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess:
    res = subprocess.run([PY, "-m", "noports.admin", *args], input=stdin, capture_output=True,
                         text=True, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"noports {' '.join(args)} -> {res.returncode}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("enroll")
    with noports_world(base, n_devices=1, daemons=False) as w:
        yield w
    for line in FIGURES:
        print(line, file=sys.stderr)


def plane_args(w) -> list[str]:
    return ["--root", w.root, "--ca", w.ca]


def operator(w) -> list[str]:
    return [*plane_args(w), "--keys", str(w.keyfile(DEV))]


def connect(w, atsign: str) -> AtConnection:
    ctx = client_context(Path(w.ca))
    host, port = w.root.rsplit(":", 1)
    h, p = find_secondary(host, int(port), atsign, ctx)
    return AtConnection(h, p, ctx, timeout=10)


def enroll_device(w, name: str, device_dir: Path) -> tuple[str, Path]:
    code = noports("enroll", "otp", DEV, *operator(w), "--ttl", "600").stdout.strip()
    pending = json.loads(noports("enroll", "request", DEV, *plane_args(w), "--otp-file", "-",
                                 "--device", name, "--keys-dir", str(device_dir), "--json",
                                 stdin=code).stdout)
    assert pending["status"] == "pending"
    eid = pending["enrollmentId"]
    listed = json.loads(noports("enroll", "list", DEV, *operator(w), "--status", "pending",
                                "--json").stdout)
    assert [r["deviceName"] for r in listed if r["enrollmentId"] == eid] == [name]
    assert "approved" in noports("enroll", "approve", DEV, eid, *operator(w)).stdout
    done = json.loads(noports("enroll", "request", DEV, *plane_args(w), "--device", name,
                              "--keys-dir", str(device_dir), "--wait", "20", "--json").stdout)
    assert done["status"] == "approved"
    keys_file = Path(done["keys_file"])
    assert keys_file.stat().st_mode & 0o777 == 0o600
    return eid, keys_file


def test_wrong_replayed_and_guessed_codes_while_others_are_served(world, tmp_path):
    w = world
    code = noports("enroll", "otp", DEV, *operator(w), "--ttl", "60").stdout.strip()
    first = noports("enroll", "request", DEV, *plane_args(w), "--otp-file", "-", "--device",
                    "one", "--keys-dir", str(tmp_path / "a"), stdin=code)
    assert "pending" in first.stdout
    replay = noports("enroll", "request", DEV, *plane_args(w), "--otp-file", "-", "--device",
                     "two", "--keys-dir", str(tmp_path / "b"), stdin=code, check=False)
    assert replay.returncode == 2 and "invalid otp" in replay.stderr
    assert "used already or expired" in replay.stderr
    huge = noports("enroll", "request", DEV, *plane_args(w), "--otp-file", "-", "--device",
                   "three", "--keys-dir", str(tmp_path / "c"), stdin="X" * 5000, check=False)
    assert huge.returncode == 2 and "too long" in huge.stderr
    # guessing on one connection: closed after 3 wrong codes; the atServer serves others
    guesser = connect(w, DEV)
    req = {"appName": "x", "deviceName": "g", "namespaces": {"x": "rw"},
           "apkamPublicKey": "QUJD", "encryptedAPKAMSymmetricKey": "QUJD"}
    errors = []
    for i in range(3):
        try:
            guesser.command("enroll:request:" + json.dumps({**req, "otp": f"WRONG{i}"}))
        except AtProtocolError as exc:
            errors.append(str(exc))
    assert all("invalid otp" in e for e in errors) and "closing" in errors[-1]
    with pytest.raises(Exception):  # noqa: B017 - closed by the server: any read error
        guesser.command("info:brief")
    with connect(w, DEV) as other:
        assert json.loads(other.command("info:brief"))["version"]
    listed = noports("enroll", "list", DEV, *operator(w), "--json")
    assert json.loads(listed.stdout)
    # drop the pending request made above
    eid = json.loads(noports("enroll", "list", DEV, *operator(w), "--status", "pending",
                             "--json").stdout)[0]["enrollmentId"]
    assert "denied" in noports("enroll", "deny", DEV, eid, *operator(w)).stdout
    denied = noports("enroll", "request", DEV, *plane_args(w), "--device", "one", "--keys-dir",
                     str(tmp_path / "a"), check=False)
    assert denied.returncode == 2 and "was denied; ask the operator for a new code" in \
        denied.stderr



def test_device_key_runs_sshnpd_and_revocation_ends_everything(world, tmp_path):
    w = world
    eid, keys_file = enroll_device(w, "dev1", tmp_path / "device-keys")
    keys = load_atkeys(keys_file)
    assert keys.enrollment_id == eid
    # sshnpd on the device key alone
    argv = w.sshnpd_argv(1)
    argv[argv.index("-k") + 1] = str(keys_file)
    daemon = w.topo.spawn_in(w.device(1).ns, argv, env={"HOME": str(w.device(1).home)})
    daemon.wait_for(r'"event": "ready"', timeout=30)
    # a live atServer connection of the device (a monitor, like sshnpd's)
    mon = connect(w, DEV)
    mon.authenticate_pkam(DEV, keys.pkam_private, eid)
    mon.send("monitor")
    # a live ssh session through srvd, in exec mode: `sleep` holds it open
    ssh = subprocess.Popen(w.sshnp_argv(1, "sleep", "300"), env=w.client_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert w.srvd is not None
        w.srvd.wait_for(r"session \S+ opened for " + CLIENT, timeout=60)
        time.sleep(1.0)
        assert ssh.poll() is None, ssh.stderr.read() if ssh.stderr else ""
        t0 = time.monotonic()
        assert "revoked" in noports("enroll", "revoke", DEV, eid, *operator(w)).stdout
        # the device's atServer connection is closed at once
        mon._sock.settimeout(10)
        closed = b""
        try:
            while chunk := mon._sock.recv(4096):
                closed += chunk
        except (TimeoutError, OSError):
            pass
        t_conn = time.monotonic() - t0
        assert t_conn < 10, "device connection still open 10 s after revocation"
        # its pkam is refused with the reason
        again = connect(w, DEV)
        with pytest.raises(AtProtocolError, match="revoked"):
            again.authenticate_pkam(DEV, keys.pkam_private, eid)
        again.close()
        # srvd ends the live session (hang detection only: 5 min is the requirement)
        w.srvd.wait_for(r"ending session \S+: " + DEV + " revoked a device key", timeout=300)
        rc = ssh.wait(timeout=60)
        t_sess = time.monotonic() - t0
        assert rc != 0
        FIGURES.append(f"revocation figures: device connection closed {t_conn:.2f} s, ssh "
                       f"session ended {t_sess:.1f} s after `noports enroll revoke`")
        # the operator's own keys still work
        with connect(w, DEV) as op:
            op.authenticate_pkam(DEV, load_atkeys(w.keyfile(DEV)).pkam_private)
    finally:
        if ssh.poll() is None:
            ssh.kill()
            ssh.wait()
        daemon.stop()
        mon.close()


def ansible(w, tmp: Path, module: str, args: dict) -> dict:
    """Run one module with the real `ansible` CLI on localhost; the task's result."""
    from tests.harness.ansible import ansible_tool, snapshot_collection

    colls = tmp / "collections"
    if not colls.exists():
        snapshot_collection(colls)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_COLLECTIONS_PATH=str(colls), ANSIBLE_STDOUT_CALLBACK="minimal",
               ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"),
               ANSIBLE_HOME=str(tmp / "ansible-home"), HOME=str(tmp))
    res = subprocess.run([ansible_tool("ansible"), "localhost", "-c", "local", "-i",
                          "localhost,", "-e", f"ansible_python_interpreter={sys.executable}",
                          "-m", f"noports.sshnp.{module}", "-a", json.dumps(args)],
                         env=env, capture_output=True, text=True, timeout=180)
    assert "=>" in res.stdout, res.stdout + res.stderr
    head, _, rest = res.stdout.partition("=>")
    out = json.loads(rest)
    out["failed"] = "FAILED" in head
    return out


def runtime_prefix(tmp: Path) -> Path:
    """A runtime prefix whose programs are the real ones (this venv)."""
    p = tmp / "opt"
    (p / "bin").mkdir(parents=True)
    (p / "venv" / "bin").mkdir(parents=True)
    (p / "bin" / "noports").symlink_to(Path(sys.executable).parent / "noports")
    (p / "venv" / "bin" / "python").symlink_to(sys.executable)
    return p


def test_ansible_modules_enroll_approve_and_revoke_a_device(world, tmp_path):
    w = world
    prefix = str(runtime_prefix(tmp_path))
    plane = {"atsign": DEV, "root_domain": w.root, "ca_file": w.ca, "runtime_prefix": prefix}
    op = {**plane, "keys_file": str(w.keyfile(DEV))}
    otp = ansible(w, tmp_path, "atsign_enrollment", {**op, "action": "otp", "ttl": 900})
    assert otp["changed"] and len(otp["otp"]) == 6, otp
    dev = {**plane, "method": "enroll", "device_name": "ans1",
           "keys_dir": str(tmp_path / "device")}
    first = ansible(w, tmp_path, "atsign_keys", {**dev, "otp": otp["otp"]})
    assert first["changed"] and first["action"] == "pending", first
    assert otp["otp"] not in json.dumps(first)
    ok = ansible(w, tmp_path, "atsign_enrollment", {**op, "action": "approve",
                                                     "device_name": "ans1"})
    assert ok["changed"] and ok["status"] == "approved", ok
    assert ok["enrollment_id"] == first["enrollment_id"]
    done = ansible(w, tmp_path, "atsign_keys", {**dev, "wait": 20})
    assert done["action"] == "enrolled", done
    assert load_atkeys(done["path"]).enrollment_id == first["enrollment_id"]
    again = ansible(w, tmp_path, "atsign_keys", dev)
    assert not again["changed"] and again["action"] == "none", again
    gone = ansible(w, tmp_path, "atsign_enrollment", {**op, "action": "revoke",
                                                       "device_name": "ans1"})
    assert gone["changed"] and gone["status"] == "revoked", gone
    same = ansible(w, tmp_path, "atsign_enrollment", {**op, "action": "revoke",
                                                       "device_name": "ans1"})
    assert not same["changed"], same
    bad = ansible(w, tmp_path, "atsign_enrollment", {**op, "action": "approve",
                                                      "device_name": "nosuch"})
    assert bad.get("failed") and "no pending enrollment" in bad["msg"], bad
