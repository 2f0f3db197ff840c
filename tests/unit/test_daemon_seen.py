"""The replay memory on disk: survives restarts and kill -9, stays bounded, never forgets early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from noports.daemon.config import build_config
from noports.daemon.handler import DaemonHandler, Inbound, Reply, SessionPlan
from noports.daemon.seen import FILE_NAME, SeenRequests, SeenStoreError
from noports.daemon.sshkeys import EphemeralKey
from noports.npproto import SshRequest, dart_iso, sign_envelope

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "npproto"
KEYS = json.loads((FIX / "test_keys.json").read_text())
CPUB, CPRIV = KEYS["client"]["publicKey"], KEYS["client"]["privateKey"]
DPRIV = KEYS["device"]["privateKey"]


class Clock:
    def __init__(self, t: float = 1_780_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def sid() -> str:
    return str(uuid.uuid4())


def test_ids_survive_a_restart_until_they_expire(tmp_path):
    clock = Clock()
    a = SeenRequests.open(tmp_path, clock=clock)
    s1, s2 = sid(), sid()
    assert a.add(s1, clock.t + 60) and a.add(s2, clock.t + 5)
    assert not a.add(s1, clock.t + 60)  # same process: a replay
    b = SeenRequests.open(tmp_path, clock=clock)  # "restart"
    assert s1 in b and s2 in b and not b.add(s1, clock.t + 60)
    clock.t += 10
    c = SeenRequests.open(tmp_path, clock=clock)
    assert s1 in c and s2 not in c and len(c) == 1
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o777 == 0o600


def test_torn_and_foreign_lines_are_skipped(tmp_path):
    clock = Clock()
    s1 = sid()
    (tmp_path / FILE_NAME).write_bytes(
        f"v1 {int(clock.t) + 60} {s1}\n".encode()
        + b"garbage\n\x00\xff\nv1 99999999999999 ../../etc\nv2 1 x\n"
        + f"v1 {int(clock.t) + 60} {sid()[:20]}".encode())  # torn last line (no newline)
    s = SeenRequests.open(tmp_path, clock=clock)
    assert s1 in s
    # the torn line was a prefix of an id: it must not block an unrelated id, and appends
    # after it start on a fresh line
    s2 = sid()
    assert s.add(s2, clock.t + 60)
    assert s2 in SeenRequests.open(tmp_path, clock=clock)


def test_file_stays_bounded_by_the_window(tmp_path):
    clock = Clock()
    s = SeenRequests.open(tmp_path, clock=clock)
    for _ in range(500):  # 500 requests, one a second, each live for 20 s
        assert s.add(sid(), clock.t + 20)
        clock.t += 1
    lines = (tmp_path / FILE_NAME).read_text().splitlines()
    assert len(lines) <= 2 * (22 + 64) + 64 + 1  # live ids (+ not yet pruned) and slack
    assert len(s) <= 22 + 64


def test_full_memory_refuses_instead_of_forgetting(tmp_path):
    clock = Clock()
    s = SeenRequests.open(tmp_path, clock=clock, max_entries=3)
    kept = [sid() for _ in range(3)]
    for k in kept:
        assert s.add(k, clock.t + 60)
    with pytest.raises(SeenStoreError, match="replay memory is full"):
        s.add(sid(), clock.t + 60)
    assert all(k in s for k in kept)
    clock.t += 62  # once they expire (whole seconds, rounded up) there is room again
    assert s.add(sid(), clock.t + 60)


def test_unwritable_storage_is_an_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SeenStoreError, match="storage directory"):
        SeenRequests.open(f / "sub")
    if os.geteuid() != 0:  # root ignores modes
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(SeenStoreError):
            SeenRequests.open(ro)


def test_compaction_keeps_what_another_process_appended(tmp_path):
    clock = Clock()
    a = SeenRequests.open(tmp_path, clock=clock)
    b = SeenRequests.open(tmp_path, clock=clock)
    theirs = sid()
    assert b.add(theirs, clock.t + 600)
    for _ in range(150):
        a.add(sid(), clock.t + 1)
        clock.t += 2  # a's own ids expire: it compacts
    assert theirs in SeenRequests.open(tmp_path, clock=clock)
    assert not (tmp_path / (FILE_NAME + ".tmp")).exists()


WRITER = r"""
import sys, time, uuid
from pathlib import Path
from noports.daemon.seen import SeenRequests
s = SeenRequests.open(Path(sys.argv[1]), max_entries=100000)
while True:
    k = str(uuid.uuid4())
    s.add(k, time.time() + 3600)
    print(k, flush=True)  # only after add() returned: the id is durable from here on
"""


def test_every_acknowledged_id_survives_kill9(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)],
                         stdout=subprocess.PIPE, text=True)
    acked = []
    assert p.stdout is not None
    try:
        for line in p.stdout:
            acked.append(line.strip())
            if len(acked) >= 200:  # enough appends (and at least one compaction check)
                break
        os.kill(p.pid, signal.SIGKILL)  # mid-stream, maybe mid-write
    finally:
        p.wait(timeout=10)
    after = SeenRequests.open(tmp_path)
    missing = [k for k in acked if k not in after]
    assert not missing
    assert p.returncode == -signal.SIGKILL


# --- the handler with a store on disk: a replay after a restart is refused ---------------------

def make(tmp_path: Path, clock: Clock) -> tuple[DaemonHandler, list[int]]:
    calls: list[int] = []

    def keygen(algo: str) -> EphemeralKey:
        calls.append(1)
        return EphemeralKey("-----BEGIN OPENSSH PRIVATE KEY-----\nX\n-----END OPENSSH "
                            "PRIVATE KEY-----\n", "ssh-ed25519 AAAA")

    cfg = build_config({"atsign": "@device", "managers": ["@client"], "device": "pi",
                        "storage_path": str(tmp_path)})
    h = DaemonHandler(cfg, DPRIV, seen=SeenRequests.open(cfg.storage_dir, clock=clock),
                      keygen=keygen, clock=clock)
    return h, calls


def test_replay_after_restart_is_refused(tmp_path):
    from datetime import datetime, timezone
    clock = Clock()
    s = sid()
    value = sign_envelope(SshRequest(
        session_id=s, host="127.0.0.1", port=4000, authenticate_to_rvd=True,
        client_nonce=dart_iso(datetime.fromtimestamp(clock.t - 3, timezone.utc)),
        rvd_nonce="r").to_dict(), CPRIV)
    n = Inbound("n1", "@client", "@device:ssh_request.pi.sshnp@client", value)
    h1, calls1 = make(tmp_path, clock)
    assert isinstance(h1.on_ssh_request(h1.route(n), CPUB), SessionPlan)
    clock.t += 20  # restarted 20 s later, the request is still inside its window
    h2, calls2 = make(tmp_path, clock)
    r = h2.on_ssh_request(h2.route(n), CPUB)
    assert isinstance(r, Reply) and r.is_error and "already used" in r.value
    assert calls1 == [1] and calls2 == []
    clock.t += 60  # later still: refused as stale, memory or not
    h3, calls3 = make(tmp_path, clock)
    r = h3.on_ssh_request(h3.route(n), CPUB)
    assert isinstance(r, Reply) and "behind the device clock" in r.value and calls3 == []


def test_concurrent_identical_requests_record_once(tmp_path):
    # sshnpd decides in worker threads: the same id arriving twice at once wins only once
    from concurrent.futures import ThreadPoolExecutor
    clock = Clock()
    s = SeenRequests.open(tmp_path, clock=clock)
    ids = [sid() for _ in range(20)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda k: s.add(k, clock.t + 60), ids * 4))
    assert sum(results) == len(ids)
    assert all(k in SeenRequests.open(tmp_path, clock=clock) for k in ids)
