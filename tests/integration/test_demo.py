"""`make demo` (``python -m demo.run``) as a user runs it: a subprocess, end to end.

* A full run: every device reached over ``ansible_connection: sshnp``, failed=0, one
  rendezvous per device, the proof lines (as root: every TCP connect from the controller to a
  device fails, sshd listens on 127.0.0.1 only), and nothing left behind: no namespace or link
  of the run, no process mentioning its temp dir, no temp dir, no topology state file.
* Interrupted in the middle (Ctrl-C to the whole process group while the roles deploy; SIGTERM
  to the demo alone while the world is being built): exit 130 and the same "nothing left".

As root the demo uses network namespaces; otherwise (or with NOPORTS_TOPOLOGY=loopback) its
loopback fallback, and these tests check that mode instead.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.ansible import skip_reason
from tests.harness.topology import PREFIX, STATE_DIR, want_namespaces

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
N_DEVICES = 3


@dataclass
class DemoRun:
    popen: subprocess.Popen
    err: list[str] = field(default_factory=list)
    out: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _pump(self, stream, into: list[str]) -> None:  # noqa: ANN001
        for line in stream:
            with self._cond:
                into.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def start(self) -> DemoRun:
        for stream, into in ((self.popen.stderr, self.err), (self.popen.stdout, self.out)):
            threading.Thread(target=self._pump, args=(stream, into), daemon=True).start()
        return self

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.err:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.popen.poll() is not None:
                    raise AssertionError(f"no {pattern!r} on stderr (exit {self.popen.poll()}):"
                                         f"\n{self.text()}")
                self._cond.wait(min(left, 0.5))

    def finish(self, timeout: float) -> int:
        try:
            rc = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
            raise AssertionError(f"the demo did not end within {timeout} s:\n{self.text()}"
                                 ) from None
        time.sleep(0.2)  # let the reader threads drain the pipes
        return rc

    def text(self) -> str:
        return "\n".join(self.err + ["--- stdout ---"] + self.out)

    def work_dir(self) -> str:
        return self.wait_for(r"^demo: work dir (\S+)", 30).group(1)

    def run_id(self) -> str:
        return self.wait_for(r"^demo: run id ([0-9a-f]{6})", 120).group(1)


def start_demo(n_devices: int = N_DEVICES) -> DemoRun:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "demo.run", "-n", str(n_devices)],
                         cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    return DemoRun(p).start()


def leftovers(work_dir: str, run_id: str | None) -> list[str]:
    """Everything of the run that still exists."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if work_dir in cmd:
            found.append(f"process {p.name}: {cmd[:200]}")
    if Path(work_dir).exists():
        found.append(f"directory {work_dir}")
    if run_id and want_namespaces():
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                               check=False).stdout
        found += [f"netns {ln.split()[0]}" for ln in netns.splitlines()
                  if ln.startswith(f"{PREFIX}-{run_id}-")]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                               check=False).stdout
        found += [f"link {ln.split(':')[1].strip()}" for ln in links.splitlines()
                  if f" {PREFIX}{run_id}" in ln]
        if (STATE_DIR / f"{run_id}.json").exists():
            found.append(f"state file {STATE_DIR / f'{run_id}.json'}")
    return found


def assert_nothing_left(work_dir: str, run_id: str | None, demo: DemoRun) -> None:
    deadline = time.monotonic() + 10  # bounded: processes being reaped by their parents
    while (left := leftovers(work_dir, run_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"{left}\n{demo.text()}"


@pytest.fixture(autouse=True)
def _requirements() -> None:
    reason = skip_reason()  # what the demo itself needs (it says the same in its preflight)
    if reason:
        pytest.skip(reason)


@pytest.mark.timeout(600)
def test_demo_end_to_end_summary_proof_and_clean_up():
    demo = start_demo()
    work_dir, run_id = demo.work_dir(), demo.run_id()
    rc = demo.finish(540)
    print(demo.text())
    assert rc == 0, demo.text()

    # numbered steps on stderr, 1 to 7 in order
    steps = [int(m.group(1)) for ln in demo.err if (m := re.match(r"^\[(\d)/7\] ", ln))]
    assert steps == list(range(1, 8)), demo.text()

    summary = [ln for ln in demo.out if ln.startswith("demo ")]
    assert len(summary) == 1, demo.text()
    m = re.match(r"^demo OK: (\d+)/(\d+) hosts reached over sshnp, tasks ok=(\d+) changed=\d+ "
                 r"failed=(\d+) unreachable=(\d+), rendezvous=(\d+) \(sshnpd sessions=(\d+)\) "
                 r"for (\d+) devices, (\d+) .*, mode=(\w+), [\d.]+ s$", summary[0])
    assert m, summary[0]
    reached, n, ok, failed, unreachable, rv, rv_dev, n2, open_ports, mode = m.groups()
    assert int(reached) == int(n) == int(n2) == N_DEVICES, summary[0]
    assert int(failed) == int(unreachable) == 0 and int(ok) >= 5 * N_DEVICES, summary[0]
    assert int(rv) == int(rv_dev) == N_DEVICES, summary[0]  # one rendezvous per device
    assert int(open_ports) == 0, summary[0]

    proof = [ln for ln in demo.out if ln.startswith("proof ")]
    if want_namespaces():
        assert mode == "namespaces"
        for i in range(1, N_DEVICES + 1):
            probe = [ln for ln in proof if re.match(rf"proof box{i} [\d.]+: from the controller",
                                                    ln)]
            assert len(probe) == 1, proof
            results = re.findall(r"tcp/(\d+) (\w+)", probe[0])
            assert ("22", "timeout") in results and len(results) >= 4, probe[0]
            assert all(r != "ok" for _p, r in results), probe[0]  # nothing answers from outside
            inside = [ln for ln in proof if ln.startswith(f"proof box{i} listening inside")]
            assert inside and inside[0].endswith("(ss -ltnp): 127.0.0.1:22 (sshd)"), inside
            assert any(ln.startswith(f"proof box{i} inside, 127.0.0.1:22 answers: SSH-2.0-")
                       for ln in proof), proof
    else:
        assert mode == "loopback"
        assert sum("listens on nothing" in ln for ln in proof) == N_DEVICES, proof

    assert_nothing_left(work_dir, run_id, demo)


# timeouts only detect hangs: on a loaded 2-CPU machine the roles take minutes, not seconds
@pytest.mark.timeout(420)
@pytest.mark.parametrize(("sig", "when", "whole_group"), [
    # Ctrl-C in a terminal signals the whole foreground process group
    pytest.param(signal.SIGINT, r"^      role noports\.sshnp\.srvd", True, id="ctrl-c-deploying"),
    # `kill <pid>` while the sshnp ssh masters and the daemons are up
    pytest.param(signal.SIGTERM, r"^      Gathering Facts: ", False, id="sigterm-main-job"),
])
def test_demo_interrupted_in_the_middle_cleans_up(sig: int, when: str, whole_group: bool):
    demo = start_demo(n_devices=2)
    work_dir = demo.work_dir()
    run_id = demo.run_id()
    demo.wait_for(when, 300)
    if whole_group:
        os.killpg(demo.popen.pid, sig)
    else:
        demo.popen.send_signal(sig)
    rc = demo.finish(60)
    print(demo.text())
    assert rc == 130, demo.text()
    assert any(f"interrupted ({signal.Signals(sig).name})" in ln for ln in demo.err), demo.text()
    assert not any(ln.startswith("demo OK") for ln in demo.out), demo.text()
    assert_nothing_left(work_dir, run_id, demo)
