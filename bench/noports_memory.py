#!/usr/bin/env python3
"""Memory of the NoPorts runtime: an idle sshnpd, and srvd per idle session.

Not a test; prints a table. Real programs (tests/harness/world.py):

* sshnpd: RSS, PSS and USS (private pages; ``/proc/PID/smaps_rollup``) of the daemon
  process and of its session host (the child that carries sessions, decision 0024; counted
  whenever one is alive) once the daemon is ready and settled, and again after it has
  served a few real sessions (sshnp exec, both tunnel modes) and their keys expired — an
  idle daemon should not grow with the sessions it has served. The device's total counts
  both: the PSS sum, and RSS with shared pages counted once (daemon RSS + host USS; the
  host's shared pages are the interpreter and libraries the daemon maps too). Beside it,
  the same figures for bare interpreters: ``import asyncio, ssl, cryptography`` and the
  same plus the RSA primitives (which load cryptography's Rust library, as any program
  that signs must).
* srvd: VmRSS delta of the srvd process / N for N sessions opened through the real control
  plane (``<device>.request_ports.sshrvd`` notifications, answered with two ports each):
  first *open* (two listening ports, waiting), then *paired and idle* (both sides connected
  and authenticated with signed auth lines, no traffic: an idle SSH session through the
  relay). Next to it, the in-process Rendezvous figure from bench/relay_throughput.py.

    .venv/bin/python -m bench.noports_memory            # N = 500
    .venv/bin/python -m bench.noports_memory --quick    # N = 150
    .venv/bin/python -m bench.noports_memory --netns    # namespaced topology (root)
    .venv/bin/python -m bench.noports_memory --daemon   # sshnpd and the baselines only
    .venv/bin/python -m bench.noports_memory --daemon --python ~/.cache/noports-test-venvs/device-py3.8/bin/python
                     # the same with sshnpd and the baselines on a device Python (decision 0023)

Targets: <= 8 KiB per idle srvd session; sshnpd idle RSS <= 30 MiB (issue 13).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.harness.world import (
    CLIENT,
    RELAY,
    World,
    device_atsign,
    device_name,
    noports_world,
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def rollup_kib(pid: int) -> tuple[int, int, int]:
    """(Rss, Pss, Uss) in KiB from /proc/PID/smaps_rollup (Uss: private clean + dirty)."""
    got = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        got[key] = int(rest.split()[0])
    return got["Rss"], got["Pss"], got["Private_Clean"] + got["Private_Dirty"]


def session_host_pids(daemon_pid: int) -> list[int]:
    """The live session host(s) sshnpd started (its children running
    ``noports.daemon.sessionhost*``): part of the daemon's memory while alive."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_bytes()
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(b")", 1)[1].split()[:2]
        if (int(ppid) == daemon_pid and state != b"Z"
                and b"noports.daemon.sessionhost" in cmd):
            found.append(int(p.name))
    return found


def device_rss_kib(daemon_pid: int) -> int:
    """RSS of the daemon plus the private pages (USS) of its live session host(s): the
    device's resident memory with shared pages counted once."""
    total = rss_kib(daemon_pid)
    for pid in session_host_pids(daemon_pid):
        try:
            total += rollup_kib(pid)[2]
        except (OSError, KeyError):
            continue
    return total


BASELINES = {
    "python: import asyncio, ssl, cryptography": "import asyncio, ssl, cryptography",
    "python: ... + cryptography RSA (its OpenSSL bindings)":
        "import asyncio, ssl, cryptography.hazmat.primitives.asymmetric.rsa\n"
        "from cryptography.hazmat.backends import default_backend\n"
        "default_backend()",  # cryptography < 35 loads its bindings only here
}


def baseline_kib(code: str, python: str = sys.executable) -> tuple[int, int, int]:
    """(Rss, Pss, Uss) of a bare interpreter that ran ``code`` and waits."""
    p = subprocess.Popen([python, "-c", code + "\nimport sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE)
    try:
        time.sleep(1.5)
        return rollup_kib(p.pid)
    finally:
        p.communicate(b"", timeout=10)


def settle(pid: int, seconds: float = 2.0, measure=rss_kib) -> int:
    """``measure(pid)`` (VmRSS) after ``seconds`` of idling (the last of a few samples)."""
    deadline = time.monotonic() + seconds
    v = measure(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        v = measure(pid)
    return v


async def open_sessions(w: World, n: int, pair: bool) -> tuple[list, list]:
    """Request ``n`` sessions from srvd (K1 -> K2); with ``pair``, connect and authenticate
    both sides of each. Returns (sessions, sockets)."""
    from noports.atclient.aio import AtClient
    from noports.client.flow import fast_sign_envelope
    from noports.npproto import RelayRequest, RelayResponse, dart_iso_now
    from noports.npproto.envelope import relay_auth_payload

    keys = w.plane.keys
    c = await AtClient.connect(CLIENT, keys[CLIENT], w.plane.root_tuple, w.plane.ssl_context())
    answers: dict[str, asyncio.Future[str]] = {}
    loop = asyncio.get_running_loop()
    mon = c.monitor(r"\.sshrvd@")
    await mon.wait_ready(10)

    async def route() -> None:
        async for note in mon:
            sid = note.key.split(":", 1)[-1].split(".sshrvd", 1)[0]
            fut = answers.get(sid)
            if fut is not None and not fut.done() and note.value:
                fut.set_result(note.value)

    router = loop.create_task(route())
    sem = asyncio.Semaphore(32)

    async def one() -> tuple[str, str, RelayResponse]:
        sid, cn = str(uuid.uuid4()), dart_iso_now()
        answers[sid] = loop.create_future()
        async with sem:
            await c.notify(RELAY, f"{device_name(1)}.request_ports.sshrvd",
                           RelayRequest(sid, CLIENT, device_atsign(1), cn).to_json(),
                           ttl_ms=10_000)
            value = await asyncio.wait_for(answers[sid], 30)
        return sid, cn, RelayResponse.from_csv(value)

    sessions = await asyncio.gather(*(one() for _ in range(n)))
    router.cancel()
    await mon.aclose()
    await c.close()
    socks = []
    if pair:
        pairs = []
        for sid, cn, rr in sessions:
            payload = relay_auth_payload(sid, cn, rr.rvd_nonce)
            ends = []
            for port, who in ((rr.port_a, CLIENT), (rr.port_b, device_atsign(1))):
                line = fast_sign_envelope(payload, keys[who].encrypt_private).encode() + b"\n"
                rd, wr = await asyncio.open_connection(rr.host, port)
                wr.write(line)
                await wr.drain()
                socks.append(wr)
                ends.append((rd, wr))
            pairs.append(ends)
        for (_ra, wa), _b in pairs:  # prove each pair is spliced: one byte A -> B
            wa.write(b"p")
        for (_ra, _wa), (rb, _wb) in pairs:
            assert await asyncio.wait_for(rb.readexactly(1), 10) == b"p"
    return sessions, socks


def srvd_per_session(w: World, n: int, pair: bool) -> tuple[float, int, float]:
    """(KiB per session, RSS delta KiB, seconds to open) for n sessions on srvd."""
    pid = w.srvd.popen.pid  # type: ignore[union-attr]  # `ip netns exec` execs in place

    async def go() -> tuple[float, int, float]:
        await open_sessions(w, 20, pair)  # warm-up: allocator, key caches, selector maps
        await asyncio.sleep(0.5)
        before = rss_kib(pid)
        t0 = time.monotonic()
        _sessions, socks = await open_sessions(w, n, pair)
        took = time.monotonic() - t0
        await asyncio.sleep(1.5)  # let srvd finish authenticating / pairing
        after = rss_kib(pid)
        for wr in socks:
            wr.close()
        return (after - before) / n, after - before, took

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 150")
    ap.add_argument("-n", "--sessions", type=int, help="sessions per measurement (500)")
    ap.add_argument("--netns", action="store_true",
                    help="network-namespace topology (needs root); default loopback")
    ap.add_argument("--daemon", action="store_true",
                    help="only sshnpd's idle RSS/PSS beside the bare-interpreter baselines")
    ap.add_argument("--python", metavar="PATH", default=sys.executable,
                    help="--daemon: run sshnpd and the baselines with this interpreter (it "
                         "needs cryptography; the code comes from this checkout's src)")
    args = ap.parse_args()
    if args.daemon:
        daemon_only(args.netns, args.python)
        return
    n = args.sessions or (150 if args.quick else 500)
    if args.netns and os.geteuid() != 0:
        ap.error("--netns needs root")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * n + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    with tempfile.TemporaryDirectory(prefix="np-bench-mem-") as tmp, noports_world(
            Path(tmp), n_devices=1, namespaced=args.netns,
            srvd_args=("--max-sessions-per-atsign", str(4 * n + 100))) as w:
        dpid = w.daemons[1].popen.pid
        d_idle = settle(dpid, measure=device_rss_kib)
        for mode in ("aes", "ssh", "aes", "ssh"):
            w.sshnp(1, "true", mode=mode).check(f"sshnp {mode}")
        deadline = time.monotonic() + 20  # until every ephemeral key has expired
        while w.ephemeral_lines(1) and time.monotonic() < deadline:
            time.sleep(0.2)
        d_after = settle(dpid, measure=device_rss_kib)
        srvd_start = settle(w.srvd.popen.pid, 1.0)  # type: ignore[union-attr]
        open_kib, open_delta, open_s = srvd_per_session(w, n, pair=False)
        # the open sessions above close 30 s after creation; measure pairs on top of them
        pair_kib, pair_delta, pair_s = srvd_per_session(w, n, pair=True)
        topo = "netns" if w.namespaced else "loopback"

    from bench import relay_throughput as rt
    tm, rss = rt.idle_session_memory(1000)

    print(f"NoPorts runtime memory, {topo}, Python {sys.version.split()[0]}")
    print(f"{'what':<52} {'value':>12}")
    print(f"{'sshnpd + session host RSS, idle after start':<52} {d_idle / 1024:9.1f} MiB")
    print(f"{'sshnpd + session host RSS, idle after 4 sessions':<52} "
          f"{d_after / 1024:9.1f} MiB")
    print("(sshnpd + session host: daemon VmRSS + the host's private pages, shared pages once)")
    print(f"{'srvd VmRSS at start (+20 warm-up sessions later)':<52} "
          f"{srvd_start / 1024:9.1f} MiB")
    print(f"{f'srvd per OPEN session (N={n}, {open_s:.1f}s to open)':<52} "
          f"{open_kib:8.2f} KiB   (delta {open_delta} KiB)")
    print(f"{f'srvd per PAIRED idle session (N={n}, {pair_s:.1f}s)':<52} "
          f"{pair_kib:8.2f} KiB   (delta {pair_delta} KiB)")
    print(f"{'Rendezvous in-process, per open session (1000)':<52} "
          f"{rss:8.2f} KiB   (tracemalloc {tm:.2f} KiB)")
    worst = max(open_kib, pair_kib)
    print(f"target <= 8 KiB per idle srvd session: worst {worst:.2f} KiB -> "
          f"{'met' if worst <= 8 else 'NOT met'}")


def device_rows(label: str, dpid: int) -> list[tuple[str, int, int, int]]:
    """Rows for the daemon, each live session host, and the device's total."""
    d = rollup_kib(dpid)
    rows = [(f"sshnpd daemon, {label}", *d)]
    hosts = [(pid, rollup_kib(pid)) for pid in session_host_pids(dpid)]
    for pid, h in hosts:
        rows.append((f"  + its session host (pid {pid})", *h))
    if not hosts:
        rows.append(("  (no session host alive)", 0, 0, 0))
    pss = d[1] + sum(h[1] for _pid, h in hosts)
    uss = d[2] + sum(h[2] for _pid, h in hosts)
    once = d[0] + sum(h[2] for _pid, h in hosts)  # shared pages of the host counted once
    rows.append((f"  = sshnpd total, {label}", once, pss, uss))
    return rows


def timed_sshnp(w: World, mode: str) -> float:
    t0 = time.monotonic()
    w.sshnp(1, "true", mode=mode).check(f"sshnp {mode}")
    return time.monotonic() - t0


def host_code_load_s(python: str = sys.executable) -> float:
    """What the first session adds on the device: a fresh interpreter's wall time for
    ``import noports.daemon.sessionhost`` minus one that imports nothing (median of 5)."""
    def run(code: str) -> float:
        t0 = time.monotonic()
        subprocess.run([python, "-c", code], check=True)
        return time.monotonic() - t0
    loads = sorted(run("import noports.daemon.sessionhost") - run("pass") for _ in range(5))
    return loads[2]


HOST_IDLE_S = 10  # the bench's --session-host-idle (the daemon's default is 300 s)


def daemon_only(netns: bool, python: str = sys.executable) -> None:
    if python != sys.executable:  # the other interpreter gets this checkout's code
        src = str(Path(__file__).resolve().parent.parent / "src")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    version = subprocess.run([python, "-c", "import sys, cryptography; print(sys.version.split()"
                              "[0], 'cryptography', cryptography.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
    rows = [(name, *baseline_kib(code, python)) for name, code in BASELINES.items()]
    with tempfile.TemporaryDirectory(prefix="np-bench-mem-") as tmp, noports_world(
            Path(tmp), n_devices=1, namespaced=netns, daemons=False) as w:
        argv = w.sshnpd_argv(1, extra=("--session-host-idle", str(HOST_IDLE_S)))
        proc = w.spawn_sshnpd(1, [python, *argv[1:]])
        proc.wait_for(r'"event": "ready"', timeout=60)
        w.daemons[1] = proc
        dpid = proc.popen.pid
        settle(dpid, 5.0)
        rows += device_rows("idle after start", dpid)
        took = [timed_sshnp(w, mode) for mode in ("aes", "ssh", "aes")]
        deadline = time.monotonic() + 20  # until every ephemeral key has expired
        while w.ephemeral_lines(1) and time.monotonic() < deadline:
            time.sleep(0.2)
        warm = session_host_pids(dpid)
        settle(dpid, 1.0)
        rows += device_rows("after 3 sessions, keys gone", dpid)
        deadline = time.monotonic() + HOST_IDLE_S + 30
        while time.monotonic() < deadline and (
                not session_host_pids(dpid) or set(session_host_pids(dpid)) & set(warm)):
            time.sleep(0.5)
        settle(dpid, 3.0)
        rows += device_rows(f"idle again ({HOST_IDLE_S} s on)", dpid)
        took.append(timed_sshnp(w, "aes"))
        topo = "netns" if w.namespaced else "loopback"
    print(f"sshnpd memory, {topo}, Python {version}")
    print(f"{'what':<52} {'RSS MiB':>8} {'PSS MiB':>8} {'USS MiB':>8}")
    for name, rss, pss, uss in rows:
        print(f"{name:<52} {rss / 1024:8.1f} {pss / 1024:8.1f} {uss / 1024:8.1f}")
    print("total RSS counts shared pages once: daemon RSS + the hosts' private pages (USS)")
    print(f"sessions ran with --session-host-idle {HOST_IDLE_S}: a host idle that long is "
          "replaced by a fresh, bare one")
    print("sshnp exec wall time, sessions 1-3, then 4 after the replacement (1 and 4 load the "
          "host's session code; 1 also fetches the client's key): "
          + ", ".join(f"{t:.2f} s" for t in took))
    print(f"loading the host's session code in a started interpreter: "
          f"{host_code_load_s(python):.2f} s (median of 5)")
    print("target: sshnpd idle RSS <= 30 MiB (issue 13, point 6)")


if __name__ == "__main__":
    main()
