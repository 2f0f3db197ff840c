"""Fleet scale-out, end to end (ARCHITECTURE.md "Control plane: embedded default and
scale-out"; docs/scale.md).

One fleet, every program the real one (tests/harness/fleet.py):

* 6 port-less devices (own network namespace, sshd on their own 127.0.0.1:22, nftables drops
  inbound NEW), each with sshnpd and its own atSign;
* the directory on a real ``redis-server`` (relay namespace, loopback only);
* atSigns sharded over 3 ``atserver`` processes (devices round-robin, relays and client apart);
* 2 ``srvd`` instances with different atSigns; the client takes a relay list.

Shown, in order: the directory and the shards are what we say; sshnp reaches every device
(proved by the remote command: the network namespace and sshd port it ran behind) with the load
spread over both relays; srvd #1 is killed (SIGKILL) and every device is still reached
through relay #2 by fallback; an Ansible playbook over all devices with
``ansible_connection: sshnp`` (short name) succeeds through the same fallback, with one
rendezvous per host.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness.fleet import (
    CLIENT,
    REDIS_CLI,
    REDIS_SERVER,
    WHERE,
    Fleet,
    device_atsign,
    device_name,
    fleet,
    relay_atsign,
    rss_kib,
    run_playbook,
    sshnp_inventory,
)
from tests.harness.topology import SSHD, tcp_probe

N_DEVICES = 6
N_SHARDS = 3
R1, R2 = relay_atsign(1), relay_atsign(2)
RELAY_TIMEOUT = 5.0  # a dead relay costs this much per session attempt, then the next one
LIVE_RELAY_TIMEOUT = 20.0  # the client's default: no relay is down, a cold plane may be slow

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not (shutil.which("ssh") and shutil.which("ssh-keygen")
                            and Path(SSHD).exists()), reason="OpenSSH not installed"),
    pytest.mark.skipif(not (Path(REDIS_SERVER).exists() and Path(REDIS_CLI).exists()),
                       reason="redis-server / redis-cli not installed"),
    pytest.mark.skipif(shutil.which("ansible-playbook") is None
                       and not (Path(__file__).parents[2] / ".venv/bin/ansible-playbook").exists(),
                       reason="ansible-core not installed"),
]

DEVICES = list(range(1, N_DEVICES + 1))


@pytest.fixture(scope="module")
def fl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    t0 = time.monotonic()
    with fleet(tmp_path_factory.mktemp("fleet"), N_DEVICES, n_shards=N_SHARDS,
               n_relays=2) as f:
        f.setup_s = time.monotonic() - t0  # type: ignore[attr-defined]
        f.expect = {i: f.where(i) for i in DEVICES}  # type: ignore[attr-defined]
        yield f


def _sshnp_all(f: Fleet, relays_for,  # noqa: ANN001
               relay_timeout: float = RELAY_TIMEOUT) -> dict[int, tuple[int, str, str, float]]:
    """sshnp to every device at once: i -> (rc, stdout, stderr, seconds)."""
    def one(i: int) -> tuple[int, tuple[int, str, str, float]]:
        t0 = time.monotonic()
        res = f.sshnp(i, WHERE, relays=relays_for(i), relay_timeout=relay_timeout)
        return i, (res.returncode, res.stdout.strip(), res.stderr, time.monotonic() - t0)
    with ThreadPoolExecutor(len(DEVICES)) as pool:
        return dict(pool.map(one, DEVICES))


def _assert_reached(f: Fleet, got: dict[int, tuple[int, str, str, float]]) -> None:
    for i, (rc, out, err, _s) in got.items():
        assert rc == 0, f"sshnp to {device_name(i)} failed (rc={rc}):\n{err[-2000:]}"
        want = f.expect[i]  # type: ignore[attr-defined]
        assert out == want, (f"{device_name(i)}: command ran at {out!r}, expected the "
                             f"device's netns and sshd port {want!r}")
    assert len({out for _rc, out, _e, _s in got.values()}) == len(DEVICES)


def _kill_relay1(f: Fleet) -> None:
    p = f.srvd[R1]
    if p.popen.poll() is None:
        p.stop(signal.SIGKILL)
    assert p.popen.poll() is not None


# --------------------------------------------------------------------------- plane layout


def test_directory_on_redis_and_atsigns_sharded(fl: Fleet) -> None:
    # three distinct, live atserver processes
    pids = {name: s.proc.popen.pid for name, s in fl.shards.items()}
    assert len(set(pids.values())) == N_SHARDS
    assert all(s.proc.popen.poll() is None for s in fl.shards.values())
    # the directory's store is Redis: what atdirectory lists is what Redis holds
    listed = json.loads(fl.plane.atdirectory("list", "--json").stdout)
    entries = {k.lower().lstrip("@"): v for k, v in listed.items()}
    everyone = [CLIENT, R1, R2] + [device_atsign(i) for i in DEVICES]
    for atsign in everyone:
        key = atsign.lstrip("@")
        in_redis = fl.plane.redis_cli("GET", key).stdout.strip()
        assert in_redis == entries.get(key), (atsign, in_redis, entries.get(key))
        # ... and it points at the atserver process (shard) the atSign was placed on
        host, port = in_redis.rsplit(":", 1)
        assert host == fl.topo.relay_address
        shard = fl.shards[fl.shard_of[atsign]]
        assert shard.ports[atsign.lower()] == int(port)
    # devices are spread over every shard
    used = {fl.shard_of[device_atsign(i)] for i in DEVICES}
    assert used == set(fl.shards)
    # the product's lookup goes through Redis too
    res = fl.plane.atdirectory("lookup", device_atsign(1))
    assert res.stdout.strip() == fl.plane.redis_cli("GET", "np_fdev1").stdout.strip()


def test_devices_accept_no_inbound_connection(fl: Fleet) -> None:
    if not fl.namespaced:
        pytest.skip("loopback fallback: no firewall to show")
    got = tcp_probe(fl.topo, None, [(fl.topo.device_address(i), 22) for i in DEVICES])
    assert all(v != "ok" for v in got.values()), got


# --------------------------------------------------------------------------- sessions


def _first_contact(f: Fleet) -> None:
    """One session through each relay, alone: the client atSign creates its shared key for
    each relay here (see test_first_contact_burst_to_a_new_relay for why not in a burst)."""
    for r in (R1, R2):
        res = f.sshnp(1, "true", relays=[r], relay_timeout=LIVE_RELAY_TIMEOUT)
        assert res.returncode == 0, res.stderr[-2000:]


def test_sshnp_reaches_every_device_spread_over_both_relays(fl: Fleet) -> None:
    _first_contact(fl)
    before = {r: fl.srvd_sessions(r) for r in (R1, R2)}
    # odd devices list relay 1 first, even ones relay 2 first: load spread by the client
    got = _sshnp_all(fl, lambda i: [R1, R2] if i % 2 else [R2, R1],
                     relay_timeout=LIVE_RELAY_TIMEOUT)
    _assert_reached(fl, got)
    opened = {r: fl.srvd_sessions(r) - before[r] for r in (R1, R2)}
    assert opened == {R1: N_DEVICES // 2, R2: N_DEVICES - N_DEVICES // 2}, opened
    print("sshnp per device (s):", {device_name(i): round(v[3], 2) for i, v in got.items()})


def test_relay1_killed_sessions_fall_back_to_relay2(fl: Fleet) -> None:
    _kill_relay1(fl)
    before = fl.srvd_sessions(R2)
    got = _sshnp_all(fl, lambda i: [R1, R2])  # everyone asks the dead relay first
    _assert_reached(fl, got)
    assert fl.srvd_sessions(R2) - before == N_DEVICES
    slowest = max(v[3] for v in got.values())
    # the dead relay costs its timeout once per session, not more
    assert slowest < RELAY_TIMEOUT + 30, slowest
    print("fallback sshnp per device (s):",
          {device_name(i): round(v[3], 2) for i, v in got.items()})


def test_ansible_playbook_over_all_devices_through_sshnp(fl: Fleet) -> None:
    _kill_relay1(fl)  # standalone too: the plugin must fall back like the CLI
    before = fl.srvd_sessions(R2)
    inv = sshnp_inventory(fl, DEVICES, "t1", relay_order="listed",
                          relay_timeout=RELAY_TIMEOUT)
    assert inv["all"]["vars"]["ansible_connection"] == "sshnp"  # the short name
    run = run_playbook(fl, "test-sshnp", inv, forks=N_DEVICES)
    recap = run.recap()
    assert run.returncode == 0, f"rc={run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-3000:]}"
    assert set(recap) == {device_name(i) for i in DEVICES}, run.stdout[-3000:]
    for host, r in recap.items():
        assert r.get("unreachable", 0) == 0 and r.get("failed", 0) == 0, (host, r)
        assert r.get("ok", 0) == 4, (host, r)
    for i in DEVICES:  # every task ran on the device it was meant for
        where = (fl.device(i).base / "where-t1.txt").read_text().strip()
        assert where == fl.expect[i], (device_name(i), where)  # type: ignore[attr-defined]
        assert (fl.device(i).base / "fleet-t1.txt").read_text() == f"fleet {device_name(i)}\n"
    # ControlPersist: one rendezvous per host for the whole play, all through relay 2
    assert fl.srvd_sessions(R2) - before == N_DEVICES
    rss = sorted(rss_kib(p.popen.pid) for p in fl.daemons.values())
    print(f"playbook over {N_DEVICES} devices via sshnp: {run.seconds:.1f}s; "
          f"fleet setup {fl.setup_s:.1f}s; sshnpd RSS {rss[0] / 1024:.1f}-"  # type: ignore[attr-defined]
          f"{rss[-1] / 1024:.1f} MiB")


# ------------------------------------------------------------------ first-contact burst


def test_first_contact_burst_to_a_new_relay(tmp_path: Path) -> None:
    """6 concurrent sshnp of one client atSign to a relay it never used: all must be
    answered by that relay (shared-key creation is serialised across processes)."""
    with fleet(tmp_path, 1, n_shards=1, n_relays=1) as f:
        def one(_k: int) -> int:
            return f.sshnp(1, "true", relays=[R1], relay_timeout=8).returncode
        with ThreadPoolExecutor(6) as pool:
            rcs = list(pool.map(one, range(6)))
        undecryptable = [ln for ln in f.srvd[R1].lines if "cannot decrypt" in ln]
        assert rcs == [0] * 6 and not undecryptable, (rcs, undecryptable)
