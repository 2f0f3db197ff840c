#!/usr/bin/env python3
"""How fast day-2 failures name themselves (issue 15, point 2), next to the issue's figures.

Not a test; prints a table. Real programs on loopback (tests/integration/test_client_e2e.Env:
plane, srvd, sshnpd, OpenSSH sshd), the client as a fresh ``python -m noports.client.cli``
per run, Ansible through the ``noports.sshnp.sshnp`` plugin:

* unknown device / client atSign: wall time of ``sshnp ... true`` until it exits with the
  error (process start included; p50/max over N runs), and the set-up alone in-process;
* srvd killed mid-session: from the kill to the end of ssh (ProxyCommand);
* srvd killed during an ``async``/``poll`` task: from the kill to UNREACHABLE, and the task's
  own time (Ansible's poll loop sleeps ``async`` s in all, whatever the connection does: the
  floor).

    .venv/bin/python -m bench.day2_failures            # 5 runs per CLI case
    .venv/bin/python -m bench.day2_failures --runs 10 --async 60

Baseline (issue 15, HEAD 7b1e97f): unknown device 20.8 s; async/poll with a dead relay 648 s
(async 60 / poll 2: 85.6 s with ``failure_hold`` before the background rendezvous).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from test_client_e2e import CLIENT, DEV, DEVICE, RELAY, Env  # noqa: E402
from test_day2_failures import (  # noqa: E402
    NO_CLIENT,
    NO_DEVICE,
    Play,
    kill_relay_later,
    restart_relay,
    ssh_argv,
    wait_session_started,
)

from tests.harness.world import percentile  # noqa: E402

BASELINE = {"unknown device atSign": "20.8 s", "unknown client atSign": "(relay hint)",
            "srvd killed mid-session": "AttributeError",
            "async/poll, srvd killed": "648 s (85.6 s before the background rendezvous)"}


def cli_case(env: Env, swap: dict[str, str], runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        argv = [swap.get(a, a) for a in env.sshnp_args("-q", "true")]
        t0 = time.monotonic()
        subprocess.run(argv, capture_output=True, timeout=120, env=env.env(),
                       stdin=subprocess.DEVNULL)
        times.append(time.monotonic() - t0)
    return percentile(times, 50), max(times)


def inprocess_case(env: Env, device: str, client: str, runs: int) -> float:
    from noports.client.errors import SshnpError
    from noports.client.flow import open_session
    from noports.client.params import SessionParams, parse_root

    async def once() -> float:
        p = SessionParams(client_atsign=client, device_atsign=device, relays=[RELAY],
                          device=DEV, remote_user=env.user, key_file=env.keyfile(CLIENT),
                          root=parse_root(env.root), ca_file=Path(env.ca),
                          cache_dir=env.home / ".atsign" / "sshnp")
        t0 = time.monotonic()
        with contextlib.suppress(SshnpError):
            (await open_session(p)).close()
        return time.monotonic() - t0

    return percentile([asyncio.run(once()) for _ in range(runs)], 50)


def cut_case(env: Env, base: Path) -> float:
    mark = len(env.daemon.lines)
    with open(base / "cut.err", "w") as fh:
        p = subprocess.Popen(ssh_argv(env, base / "kh", "sleep 60"), stdout=subprocess.DEVNULL,
                             stderr=fh, env=env.env(), stdin=subprocess.DEVNULL)
    try:
        wait_session_started(env, mark)
        time.sleep(1)
        env.relay.kill9()
        t0 = time.monotonic()
        p.wait(60)
        return time.monotonic() - t0
    finally:
        p.kill()
        restart_relay(env)


def async_case(env: Env, base: Path, async_s: int, poll: int) -> tuple[float, float]:
    """(UNREACHABLE after the kill, the task's own time) in s, both read off the Ansible log:
    the task runs from its ``TASK [...]`` line to its ``fatal:`` (UNREACHABLE) line, without
    the playbook's start-up and exit."""
    play = Play(env, base / "ansible", Path(tempfile.mkdtemp(prefix="np15b-", dir="/tmp")))
    log = base / "ansible" / "ansible.log"
    play.run_env["ANSIBLE_LOG_PATH"] = str(log)
    mark = len(env.daemon.lines)
    killed: list[float] = []
    kill_relay_later(env, mark, 1.0, killed, after=base / "ansible" / "async")
    try:
        play.run("async", "box", [{"ansible.builtin.command": "sleep 600", "async": async_s,
                                   "poll": poll}], timeout=async_s * 3 + 120)
        kill_wall = time.time() - (time.monotonic() - killed[0]) if killed else float("nan")
    finally:
        restart_relay(env)
    start, fatal = log_times(log.read_text())
    return fatal - kill_wall, fatal - start


def log_times(text: str) -> tuple[float, float]:
    """Wall-clock times of the first ``TASK [`` and the first ``fatal:`` line of an Ansible
    log (nan when missing)."""
    def stamp(line: str) -> float:
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    lines = text.splitlines()
    start = next((stamp(ln) for ln in lines if "| TASK [" in ln), float("nan"))
    fatal = next((stamp(ln) for ln in lines if "| fatal: [" in ln), float("nan"))
    return start, fatal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per CLI case (default 5)")
    ap.add_argument("--async", dest="async_s", type=int, default=60,
                    help="the async task's async seconds (default 60, poll 2)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="np15bench-"))
    env = Env(base / "env")
    rows = []
    try:
        for name, swap, dev, cl in (
                ("unknown device atSign", {DEVICE: NO_DEVICE}, NO_DEVICE, CLIENT),
                ("unknown client atSign", {CLIENT: NO_CLIENT}, DEVICE, NO_CLIENT)):
            p50, worst = cli_case(env, swap, args.runs)
            setup = inprocess_case(env, dev, cl, args.runs)
            rows.append((name, f"{p50:.2f} s p50, {worst:.2f} s max (set-up alone "
                         f"{setup:.2f} s)"))
        rows.append(("srvd killed mid-session", f"ssh ends {cut_case(env, base):.2f} s after "
                     "the kill, naming the relay"))
        after_kill, task = async_case(env, base, args.async_s, 2)
        rows.append(("async/poll, srvd killed", f"UNREACHABLE {after_kill:.1f} s after the "
                     f"kill, task {task:.1f} s (async {args.async_s}, poll 2; floor "
                     f"{args.async_s} s)"))
    finally:
        env.stop()
    print(f"{'case':<26} {'now':<84} issue 15 (7b1e97f)")
    for name, now in rows:
        print(f"{name:<26} {now:<84} {BASELINE[name]}")


if __name__ == "__main__":
    main()
