"""Load (issue 9): 200 concurrent ``sshnp`` sessions from one controller to 20 devices
through one srvd and one plane; every one must work.

Before: 57/200 worked with the defaults. srvd refused beyond ``--max-sessions-per-atsign``
64 (and counted a session twice while answering it) without a word, so sshnp blamed a dead
relay; the directory's per-IP connection limit (64) showed up as "directory ... closed the
connection". Now srvd's defaults hold 200 sessions of one atSign, and the directory is
started with ``--max-connections-per-ip 512`` (every concurrent sshnp holds a directory
connection while it starts: the directory's default must be raised for a controller that
runs this many at once; docs/srvd.md).

The real programs throughout (fleet_harness.fleet: atdirectory on Redis, 3 atserver
shards, one srvd, 20 sshnpd, OpenSSH sshd per device, sshnp per session). The client's
timeouts are raised and the clients run at nice 19 (CLIENT_NICE) so that the verdict is
about limits, not about how fast 200 processes start on a shared 2-CPU machine; setup times
are for bench/concurrent_sessions.py, which uses the client's default timeouts and prints
them next to plain ssh. ``NP_LOAD_SESSIONS`` sets the size (200 is the issue's figure; CI
runs 50). Cost: 200 Python client processes need ~150-175 CPU seconds, so on 2 idle CPUs the
200 run takes ~200 s against ~60 s for 50: more than the suite's budget allows, hence 50 in CI.

Why a 200 run failed now and then on the shared 2-CPU box (4 of 200 in one run): the clients
run at nice 19, and when other tests run at nice 0 beside them they get a few percent of the
CPUs (one run: 190 CPU s in 12.9 min, p50 of 160 s per session in another). A session then
outlives deadlines the servers keep however slow a client is, and the failure messages
match two of them: srvd's 30 s to pair after allocating the ports (the official relay's
value; the device reached a port already closed: ``cannot connect to the socket rendezvous
... Connect call failed``), and the atServer's 60 s to authenticate (the client's connection
was closed under it: ``Broken pipe``). Not a limit being hit: starvation. On
failure the test prints the server-side lines that say which deadline fired (``diagnose``),
and ``NP_LOAD_KEEP_LOGS=DIR`` keeps every server log.

Also the helpers bench/concurrent_sessions.py uses (it imports this module by its package path).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shlex
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.fleet import SOCAT, Fleet, fleet
from tests.harness.plane import Directory, tool
from tests.harness.topology import NsPlane

pytestmark = pytest.mark.integration

# CI runs 50 (one failed run of 200 out of five on the shared 2-CPU box, cause not yet known);
# NP_LOAD_SESSIONS=200 is the figure, passed by hand (docs/srvd.md).
SESSIONS = int(os.environ.get("NP_LOAD_SESSIONS", "50"))
DEVICES = 20
DIRECTORY_FLAGS = ("--max-connections-per-ip", "512")
PATIENT = ("--connect-timeout", "120", "--daemon-timeout", "120")


@dataclass
class Outcome:
    """One session: did it print its token, how long it took, the last stderr line."""

    index: int
    device: int
    ok: bool
    seconds: float
    error: str = ""


@dataclass
class LoadResult:
    case: str
    outcomes: list[Outcome] = field(default_factory=list)
    wall: float = 0.0

    @property
    def successes(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)

    def times(self) -> list[float]:
        return sorted(o.seconds for o in self.outcomes if o.ok)

    def percentile(self, q: float) -> float:
        t = self.times()
        if not t:
            return float("nan")
        return t[min(len(t) - 1, max(0, round(q * (len(t) - 1))))]

    def failures(self) -> Counter[str]:
        """Failure messages with session ids, ports and times masked, most common first."""
        return Counter(_mask(o.error) for o in self.outcomes if not o.ok)


def _mask(text: str) -> str:
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<sid>", text)
    text = re.sub(r"\b\d+(\.\d+)?s\b", "<t>s", text)
    return re.sub(r"port \d+", "port <n>", text)[:300]


def _last_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower() or "refused" in ln.lower()
            or "closed" in ln.lower()]
    return (errs or lines or ["(no output)"])[-1]


CLIENT_NICE = 19
"""Niceness of the N client processes. Why: on one test machine the kernel shares CPU per
process, so 200 clients at nice 0 would leave the handful of server processes (directory,
atservers, srvd, sshnpd) a few percent of it, and sessions die of starvation (TLS handshakes
over 60 s, sessions unpaired after 30 s), not of any limit. In a deployment the controller
is another machine; niceness restores that here. Both cases (sshnp, ssh) get the same."""


_PR_SET_PDEATHSIG = 1


def _client_preexec() -> None:
    """In each client process before exec: lower its priority, and have the kernel kill it
    if the test process dies (a killed or timed-out run must not leave N clients behind)."""
    os.nice(CLIENT_NICE)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _run_all(argvs: Sequence[list[str]], devices: Sequence[int], env: dict[str, str],
             timeout: float, case: str) -> LoadResult:
    """Start every argv at once (at CLIENT_NICE); collect rc/stdout/stderr (bounded by
    ``timeout``). Whatever happens, no client outlives the call."""
    res = LoadResult(case)
    procs: list[tuple[float, subprocess.Popen[str]]] = []
    try:
        return _collect_all(argvs, devices, env, timeout, res, procs)
    finally:
        for _started, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _collect_all(argvs: Sequence[list[str]], devices: Sequence[int], env: dict[str, str],
                 timeout: float, res: LoadResult,
                 procs: list[tuple[float, subprocess.Popen[str]]]) -> LoadResult:
    t0 = time.monotonic()
    for argv in argvs:
        procs.append((time.monotonic(), subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=env, text=True, preexec_fn=_client_preexec)))  # noqa: PLW1509
    deadline = t0 + timeout

    def collect(k: int) -> Outcome:
        """One thread per process, so each end time is when that process ended."""
        started, p = procs[k]
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += f"\n(killed: still running after {timeout:g}s)"
        ended = time.monotonic()
        ok = p.returncode == 0 and f"tok{k}" in out
        return Outcome(k, devices[k], ok, ended - started,
                       "" if ok else f"rc={p.returncode}: {_last_error(err)}")

    pool = ThreadPoolExecutor(len(procs) or 1)
    try:
        res.outcomes = list(pool.map(collect, range(len(procs))))
    finally:  # on an exception (a test timeout), the caller kills the clients at once
        pool.shutdown(wait=False)
    res.wall = time.monotonic() - t0
    return res


def run_sshnp(f: Fleet, n: int, *, timeout: float = 240, relay_timeout: float = 20,
              flags: Sequence[str] = ()) -> LoadResult:
    """``n`` concurrent ``sshnp`` exec sessions over every device of ``f``, one relay;
    ``flags`` are extra sshnp flags (e.g. longer timeouts)."""
    devices = [(k % f.n) + 1 for k in range(n)]
    argvs = [f.sshnp_argv(d, *flags, "echo", f"tok{k}", relays=f.relays[:1],
                          relay_timeout=relay_timeout) for k, d in enumerate(devices)]
    return _run_all(argvs, devices, f.client_env(), timeout, "sshnp")


def run_plain_ssh(f: Fleet, n: int, *, timeout: float = 240) -> LoadResult:
    """Baseline: ``n`` concurrent plain ssh to the same sshds (no rendezvous). Namespaced:
    ProxyCommand ``ip netns exec <ns> socat STDIO TCP:127.0.0.1:22`` (the device's own
    loopback sshd, firewall untouched); loopback topology: direct to 127.0.0.1:port."""
    devices = [(k % f.n) + 1 for k in range(n)]
    kh = f.base / "load_known_hosts"
    kh.write_text("".join(
        f"load-dev{i} {' '.join(f.host_pub(i).read_text().split()[:2])}\n"
        for i in range(1, f.n + 1)))
    argvs = []
    for k, d in enumerate(devices):
        dev = f.device(d)
        opts = ["-o", f"HostKeyAlias=load-dev{d}", "-o", f"UserKnownHostsFile={kh}",
                "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-i", str(f.identity), "-p", str(dev.ssh_port),
                "-l", dev.ssh_user]
        if f.namespaced:
            proxy = shlex.join(["ip", "netns", "exec", str(dev.ns), SOCAT, "STDIO",
                                f"TCP:127.0.0.1:{dev.ssh_port}"])
            opts = ["-o", f"ProxyCommand={proxy}", *opts]
        argvs.append(["ssh", *opts, "127.0.0.1", "echo", f"tok{k}"])
    return _run_all(argvs, devices, f.client_env(), timeout, "ssh")


@contextlib.contextmanager
def directory_flags(*flags: str) -> Iterator[None]:
    """Start the fleet's atdirectory with extra ``serve`` flags (e.g. a per-IP limit).

    Why a patch and not a harness argument: fleet_harness starts the directory itself; this
    keeps the one load test's needs out of the shared harness."""
    original = NsPlane.start_directory

    def start_directory(self: NsPlane):  # noqa: ANN202 - plane_harness.Directory
        p = self.plane
        proc = self.topo.spawn_in(self.topo.relay_ns, [
            tool("atdirectory"), "serve", "--host", p.host, "--port", "0", "--store", p.store,
            "--tls-dir", str(p.tls.directory), *flags])
        m = proc.wait_for(r"atdirectory listening on (\S+):(\d+)")
        p.directory = Directory(proc, m.group(1), int(m.group(2)), p.store)
        return p.directory

    NsPlane.start_directory = start_directory  # type: ignore[method-assign]
    try:
        yield
    finally:
        NsPlane.start_directory = original  # type: ignore[method-assign]


def report(results: Sequence[LoadResult], n: int) -> str:
    """Side-by-side table plus the most common failure messages."""
    lines = [f"{'case':<8}{'ok':>10}{'p50 s':>9}{'p99 s':>9}{'wall s':>9}"]
    for r in results:
        lines.append(f"{r.case:<8}{f'{r.successes}/{n}':>10}{r.percentile(0.5):>9.2f}"
                     f"{r.percentile(0.99):>9.2f}{r.wall:>9.1f}")
    for r in results:
        for msg, count in r.failures().most_common(6):
            lines.append(f"  {r.case} x{count}: {msg}")
    return "\n".join(lines)


def server_logs(f: Fleet) -> dict[str, list[str]]:
    """Every server process's stderr so far, by name (for failure reports)."""
    logs: dict[str, list[str]] = {}
    d = f.plane.plane.directory
    if d is not None:
        logs["atdirectory"] = list(d.proc.lines)
    for name, srv in f.shards.items():
        logs[f"atserver-{name}"] = list(srv.proc.lines)
    for relay, proc in f.srvd.items():
        logs[f"srvd-{relay}"] = list(proc.lines)
    for i, proc in f.daemons.items():
        logs[f"sshnpd-dev{i}"] = list(proc.lines)
    return logs


SUSPECT = re.compile(r"WARNING|ERROR|Traceback|refus|evict|closing connection|not authenticated"
                     r"|timed out|timeout|reconnect|expired|never paired|failed", re.IGNORECASE)


def diagnose(res: LoadResult, logs: dict[str, list[str]], keep: Path | None = None) -> str:
    """The server-side lines that explain failures: what each failed device's daemon, the
    relay and the atServers logged as a warning, a refusal or a timeout. ``keep``: also write
    every log there (NP_LOAD_KEEP_LOGS=dir)."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for name, lines in logs.items():
            (keep / f"{name}.log").write_text("\n".join(lines) + "\n")
    failed = sorted({o.device for o in res.outcomes if not o.ok})
    out = []
    for name, lines in logs.items():
        wanted = name.startswith(("atserver", "srvd", "atdirectory")) or any(
            name == f"sshnpd-dev{d}" for d in failed)
        hits = [ln for ln in lines if wanted and SUSPECT.search(ln)]
        if hits:
            out.append(f"--- {name}: {len(hits)} suspect lines, last ones:")
            out += [ln[-300:] for ln in hits[-12:]]
    return "\n".join(out)


@pytest.mark.timeout(max(300, 150 + 3 * SESSIONS))
def test_200_concurrent_sshnp_sessions_through_one_srvd(tmp_path: Path) -> None:
    with directory_flags(*DIRECTORY_FLAGS), \
            fleet(tmp_path, DEVICES, n_shards=3, n_relays=1) as f:
        res = run_sshnp(f, SESSIONS, timeout=600, relay_timeout=120, flags=PATIENT)
        srvd = "\n".join(f.srvd[f.relays[0]].lines)
        opened = f.srvd_sessions(f.relays[0])
        logs = server_logs(f)
    keep = os.environ.get("NP_LOAD_KEEP_LOGS")
    if res.successes != SESSIONS:
        print(diagnose(res, logs, Path(keep) if keep else None))
    print("\n" + report([res], SESSIONS))  # figures, shown with -s
    assert res.successes == SESSIONS, report([res], SESSIONS) + "\n" + srvd[-3000:]
    assert opened >= SESSIONS
    assert "refused request" not in srvd and "Traceback" not in srvd
