#!/usr/bin/env python3
"""Many tunnels through one controller agent vs one ``sshnp --stdio`` process per tunnel.

Not a test; prints figures side by side and asserts nothing. Real programs
(tests/harness/world.py): plane, srvd, a few devices each with sshd and sshnpd, all on
loopback (or namespaces with --netns); the agent is ``python -m noports.agent``, each tunnel
is asked for by a real ``sshnp-connect`` process whose stdout is a socket pair standing in
for OpenSSH's ProxyUseFdpass (the fd it passes is kept open, so the tunnel stays live).

Measured:

* today's design: ``--baseline`` standalone ``sshnp --stdio`` processes, each holding one
  live tunnel: PSS and CPU (utime + stime, whole life so far) per process;
* the agent: PSS growth and agent CPU per tunnel over ``--tunnels`` live tunnels, plus the
  connector's own CPU per run (RUSAGE_CHILDREN), and the agent's PSS with no tunnel;
* warm rendezvous: request -> spliced socket received, agent already up and logged in,
  ``--rendezvous`` sequential requests straight on the agent's socket (no process start).

Every tunnel ends at a device's sshd, which drops unauthenticated connections beyond its
MaxStartups (100:30:200 in the harness) and sshnpd serves at most --max-sessions at once, so
tunnels per device stay below 100: 1,000 tunnels need 11+ devices (``--devices 12
--tunnels 1000``); the default is 4 devices x 75. Each tunnel sends an SSH client banner
and no more (the device closes a session whose client sent nothing for 60 s), and the
devices' sshd get ``LoginGraceTime 0`` (else they drop a tunnel that has not logged in
after 120 s, while a big batch is still opening).

    .venv/bin/python -m bench.agent_tunnels                        # 4 devices, 300 tunnels
    .venv/bin/python -m bench.agent_tunnels --devices 12 --tunnels 1000
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.rendezvous_trace import print_breakdown
from noports.agent import protocol as proto
from noports.agent.connect import socket_address
from tests.harness.fleet import cpu_s, pss_kib
from tests.harness.world import PY, World, noports_world, percentile

CONNECT = str(Path(PY).parent / "sshnp-connect")
STEPS: list[dict[str, float]] = []  # the flow's own marks per warm rendezvous
WINDOWS: list[tuple[float, float]] = []  # wall clock (start, end) of each warm rendezvous


def client_args(w: World, i: int, kh: Path) -> list[str]:
    """``sshnp --stdio`` arguments for device i (without the interpreter and module)."""
    return w.sshnp_argv(i, "--known-hosts", str(kh))[3:]


def open_via_connector(w: World, d: Path, args: list[str]) -> socket.socket:
    a, b = socket.socketpair()
    p = subprocess.Popen([CONNECT, "--agent-dir", str(d), *args], stdout=b,
                         stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=w.client_env())
    b.close()
    a.settimeout(120)
    try:
        _msg, fds, _f, _addr = socket.recv_fds(a, 16, 1)
    finally:
        a.close()
    _out, err = p.communicate(timeout=120)
    if p.returncode != 0 or not fds:
        raise RuntimeError(f"connector failed: {err.decode(errors='replace').strip()}")
    return client_hello(socket.socket(fileno=fds[0]))


def client_hello(sock: socket.socket) -> socket.socket:
    """Send an SSH client banner, as ssh does at once: the device's session host closes a
    session whose client sent nothing within 60 s (sessionhost.CLIENT_WAIT_S)."""
    sock.sendall(b"SSH-2.0-npbench\r\n")
    return sock


def rendezvous(d: Path, args: list[str]) -> tuple[float, float, socket.socket]:
    """(request -> fd seconds, agent-side set-up seconds, the tunnel) on a warm agent."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(socket_address(str(d)))
    w0 = time.time()
    t0 = time.perf_counter()
    s.sendall(proto.encode_request("open", args, os.getcwd()))
    buf = proto.LineBuffer()
    fd = None
    while True:
        data, fds, _f, _a = socket.recv_fds(s, 65536, 1)
        fd = fds[0] if fds else fd
        if not data:
            raise RuntimeError("agent closed without an answer")
        for line in buf.feed(data):
            r = proto.parse_reply(line)
            if r.kind == "error":
                raise RuntimeError(r.text)
            if r.kind == "ok":
                took = time.perf_counter() - t0
                WINDOWS.append((w0, time.time()))
                s.close()
                assert fd is not None
                STEPS.append(r.info.get("steps") or {})
                return (took, float(r.info.get("setup_s", 0)),
                        client_hello(socket.socket(fileno=fd)))


def keep_banner_only_connections(w: World, i: int) -> None:
    """The bench's tunnels never log in: sshd's LoginGraceTime (120 s) would drop the first
    ones while a 1,000-tunnel batch is still opening. ``LoginGraceTime 0`` (no limit) and a
    SIGHUP (sshd re-executes itself with the new config, keeping its listener)."""
    dev = w.device(i)
    assert dev.sshd is not None
    cfg = dev.base / "sshd_config"
    cfg.write_text(cfg.read_text() + "LoginGraceTime 0\n")
    dev.sshd.popen.send_signal(signal.SIGHUP)
    time.sleep(0.5)


def agent_stats(d: Path) -> dict:
    """The agent's own counters (``sshnp-connect --agent-stats``), straight on its socket."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(socket_address(str(d)))
    s.sendall(proto.encode_request("stats", [], os.getcwd()))
    buf, data = proto.LineBuffer(), b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return proto.parse_reply(buf.feed(data)[0]).info


def ended_reasons(d: Path) -> collections.Counter:
    """Why tunnels ended while the batch ran: the agent's ``tunnel to ... ended: <why>``
    lines, ports and numbers blanked so that alike causes count together."""
    out: collections.Counter = collections.Counter()
    for line in (d / "agent.log").read_text(errors="replace").splitlines():
        if " ended: " in line or "ended (" in line or "set-up failed" in line:
            out[re.sub(r"\d+", "N", line.split(": ", 2)[-1])[:200]] += 1
    return out


def _nofile(pid: int) -> str:
    """The soft limit of open files of ``pid`` (from /proc)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    return "?"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def banner_ok(sock: socket.socket) -> bool:
    sock.settimeout(20)
    try:
        return sock.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--tunnels", type=int, default=300)
    ap.add_argument("--baseline", type=int, default=5, help="standalone processes (5)")
    ap.add_argument("--rendezvous", type=int, default=30, help="warm rendezvous samples")
    ap.add_argument("--parallel", type=int, default=8, help="connectors at once (8)")
    ap.add_argument("--gap", type=float, default=0.5,
                    help="seconds between warm rendezvous samples (0.5; 0 = back to back, "
                    "then the session key generation of the next one is on the path)")
    ap.add_argument("--netns", action="store_true", help="namespaces (root)")
    ap.add_argument("--agent-nofile", type=int, default=1024,
                    help="soft open-files limit the agent is started with (1024, the usual "
                    "default; 0 = this shell's); the agent raises it to the hard limit")
    ap.add_argument("--no-trace", action="store_true",
                    help="run the programs without NOPORTS_TRACE (no per-hop breakdown)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # the bench holds every tunnel's fd itself; the agent starts with the caller's own soft
    # limit (--agent-nofile), as a user's would, and must raise it itself
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 16384)), hard))
    args.agent_limits = (min(args.agent_nofile or soft, hard), hard)
    per_dev = -(-args.tunnels // args.devices) + args.rendezvous + 4
    with tempfile.TemporaryDirectory(prefix="npat-") as tmp0:
        if args.no_trace:
            os.environ.pop("NOPORTS_TRACE", None)
        elif not os.environ.get("NOPORTS_TRACE"):  # set by the caller: kept after the run
            # every program started from here on appends its marks
            os.environ["NOPORTS_TRACE"] = str(Path(tmp0) / "trace")
        return world(args, per_dev, Path(tmp0))


def world(args: argparse.Namespace, per_dev: int, tmp0: Path) -> int:
    with tempfile.TemporaryDirectory(prefix="npat-", dir=tmp0) as tmp, noports_world(
            Path(tmp), args.devices, namespaced=args.netns, daemons=False,
            srvd_args=("--max-sessions-per-atsign", str(4 * args.tunnels + 200))) as w:
        for i in range(1, args.devices + 1):
            keep_banner_only_connections(w, i)
            w.start_sshnpd(i, extra=("--max-sessions", str(per_dev + args.baseline + 10)))
        kh = Path(tmp) / "known_hosts"
        d = Path(tmp) / "ag"
        d.mkdir(mode=0o700)
        with open(d / "agent.log", "ab") as log:
            agent = subprocess.Popen([PY, "-m", "noports.agent", "--dir", str(d), "--idle",
                                      "900"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=log, env=w.client_env(),
                                     preexec_fn=lambda: resource.setrlimit(
                                         resource.RLIMIT_NOFILE, args.agent_limits))
        try:
            return run(args, w, kh, d, agent)
        finally:
            agent.terminate()
            agent.wait(30)


def run(args: argparse.Namespace, w: World, kh: Path, d: Path, agent: subprocess.Popen
        ) -> int:
    devs = list(range(1, args.devices + 1))
    while not (d / "agent.sock").exists():
        time.sleep(0.05)
    # warm-up: first contact with every device and the relay (shared keys), both designs
    for i in devs:
        banner_ok(open_via_connector(w, d, client_args(w, i, kh)))
    time.sleep(1.0)
    # today's design: one standalone process per tunnel
    base_procs = []
    for k in range(args.baseline):
        i = devs[k % len(devs)]
        p = subprocess.Popen([PY, "-m", "noports.client.cli", "--stdio",
                              *[a for a in client_args(w, i, kh) if a != "-q"]],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=w.client_env())
        assert p.stderr is not None
        for line in p.stderr:
            if b"tunnel ready" in line or b"error" in line:
                break
        base_procs.append(p)
    time.sleep(1.5)
    base_pss = [pss_kib(p.pid) for p in base_procs]
    base_cpu = [cpu_s(p.pid) for p in base_procs]
    # warm rendezvous, sequential, straight on the agent's socket
    rv, rv_agent, held = [], [], []
    for k in range(args.rendezvous):
        took, inside, sock = rendezvous(d, client_args(w, devs[k % len(devs)], kh))
        rv.append(took)
        rv_agent.append(inside)
        held.append(sock)
        time.sleep(args.gap)
    time.sleep(1.5)
    pss0, cpu0 = pss_kib(agent.pid), cpu_s(agent.pid)
    live0 = len(held)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    failed: list[str] = []

    def one(k: int) -> socket.socket | None:
        try:
            return open_via_connector(w, d, client_args(w, devs[k % len(devs)], kh))
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            failed.append(str(exc))
            return None
    with ThreadPoolExecutor(args.parallel) as pool:
        opened = [s for s in pool.map(one, range(args.tunnels)) if s is not None]
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    time.sleep(2.0)
    n = len(opened)
    pss1, cpu1 = pss_kib(agent.pid), cpu_s(agent.pid)
    live_in_agent = int(agent_stats(d)["tunnels"])  # sshd drops a banner-only one at 120 s
    conn_cpu = ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) / max(
        args.tunnels, 1)
    alive = sum(banner_ok(s) for s in opened[:: max(1, n // 20)])
    sampled = len(opened[:: max(1, n // 20)])
    print(f"\nagent tunnels bench: {'netns' if w.namespaced else 'loopback'}, "
          f"{os.cpu_count()} CPUs (shared machine: absolute figures pessimistic), "
          f"{args.devices} devices, aes tunnels")
    print(f"opened {n}/{args.tunnels} tunnels through the agent in {wall:.1f}s "
          f"({args.parallel} connectors at once); live at the end: {alive}/{sampled} sampled "
          f"answer with the sshd banner; total live in the agent {live_in_agent} "
          f"(opened {n + live0})")
    for f in failed[:3]:
        print(f"  failed: {f}")
    for why, count in ended_reasons(d).most_common(4):
        print(f"  ended before the measurement ({count}): {why}")
    print(f"agent open files: {len(os.listdir(f'/proc/{agent.pid}/fd'))} in use, limit "
          f"{_nofile(agent.pid)} (started with soft {args.agent_nofile or 'inherited'}); "
          f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print()
    print(f"{'per live tunnel on the controller':<46} {'per-process':>12} {'agent':>12}")
    print(f"{'PSS (MiB)':<46} {median(base_pss) / 1024:>12.2f} "
          f"{(pss1 - pss0) / max(n, 1) / 1024:>12.3f}")
    print(f"{'client CPU (s): process / agent+connector':<46} "
          f"{median(base_cpu):>12.3f} "
          f"{(cpu1 - cpu0) / max(n, 1) + conn_cpu:>12.3f}")
    print(f"{'  of which agent CPU per tunnel (s)':<46} {'':>12} "
          f"{(cpu1 - cpu0) / max(n, 1):>12.3f}")
    print(f"{'  of which connector CPU per run (s)':<46} {'':>12} {conn_cpu:>12.3f}")
    print(f"agent PSS: {pss0 / 1024:.1f} MiB with {live0} tunnels, {pss1 / 1024:.1f} MiB "
          f"with {n + live0} (a fixed ~interpreter cost, shared by every host)")
    print(f"warm rendezvous (request -> spliced socket in hand), {len(rv)} sequential "
          f"{args.gap:g}s apart: "
          f"p50 {percentile(rv, 50) * 1000:.1f} ms, p90 {percentile(rv, 90) * 1000:.1f} ms "
          f"(agent-side set-up p50 {percentile(rv_agent, 50) * 1000:.1f} ms); goal <= 50 ms")
    marks = sorted({k for st in STEPS for k in st}, key=lambda k: percentile(
        [st[k] for st in STEPS if k in st], 50))
    print("  where (flow marks, p50 ms since the request reached the flow): " + ", ".join(
        f"{k} {percentile([st[k] for st in STEPS if k in st], 50) * 1000:.0f}"
        for k in marks))
    trace = os.environ.get("NOPORTS_TRACE")
    if trace:
        print_breakdown(Path(trace), WINDOWS, percentile(rv, 50))
    for s in opened + held:
        s.close()
    for p in base_procs:
        p.kill()
        p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
