"""Restricted egress: a device allowed to connect out only to the relay's tcp/443 (and its
plane) is reached through srvd's single-port mode with ESCR (issue 11 point 4).

Real programs in the namespaced topology: the plane, ``srvd --443`` (binding 443 in the relay
namespace), sshnpd in a device namespace whose nftables output chain rejects every new
connection except to the relay address on tcp/443 and to the plane's directory and atServer
ports (the daemon must reach its atServer to hear requests at all; docs/official-peers.md
explains how a self-hosted plane can sit on 443 too), and the client ``sshnp`` in the root
namespace.

Shown: (1) the firewall bites: a per-session-port session cannot reach the device and the
user is told which step failed; (2) ``sshnp --443`` runs a command on the device; (3) with
hostile sockets attached to the single port (idle ones, garbage, a forged response) three
concurrent ``--443`` sessions still succeed, and the squatters get only a challenge and the
refusal.
"""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness.topology import SSHD, want_namespaces
from tests.harness.world import EVE, RELAY, Timed, World, noports_world, run_timed

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (shutil.which("ssh") and shutil.which("ssh-keygen")
                            and Path(SSHD).exists()), reason="OpenSSH not installed"),
]


def egress_rules(relay: str, ports: list[int]) -> str:
    allowed = ", ".join(str(p) for p in sorted(set(ports)))
    return f"""\
table inet np_egress {{
  chain output {{
    type filter hook output priority 0; policy accept;
    oif "lo" accept
    ct state established,related accept
    ip daddr {relay} tcp dport {{ {allowed} }} accept
    counter reject
  }}
}}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("egress")
    # the single port: 443 in the namespaced topology, any free port in the loopback fallback
    port = "443" if want_namespaces() else "0"
    with noports_world(base, n_devices=1, daemons=False,
                       srvd_args=("--443", "--443-bind-port", port)) as w:
        assert w.srvd is not None
        m = w.srvd.wait_for(r"single port (\d+)", timeout=10)
        w.single_port = int(m.group(1))  # type: ignore[attr-defined]
        if w.namespaced:
            plane_ports = [w.plane.directory.port]  # type: ignore[union-attr]
            plane_ports += [p for s in w.plane.servers for p in s.ports.values()]
            w.topo.run_in(w.device(1).ns, ["nft", "-f", "-"],
                          input=egress_rules(w.topo.relay_address, [443, *plane_ports]))
        w.start_sshnpd(1)
        yield w


def sshnp443(world: World, command: str) -> Timed:
    return run_timed(world.sshnp_argv(1, "--443") + [command], env=world.client_env(),
                     timeout=90)


def ok(res, world: World) -> None:  # noqa: ANN001
    if res.returncode != 0:
        raise AssertionError(f"rc={res.returncode}\nstdout: {res.stdout}\nstderr: "
                             f"{res.stderr[-3000:]}\nsshnpd:\n"
                             + "\n".join(world.daemons[1].lines[-20:]) + "\nsrvd:\n"
                             + "\n".join(world.srvd.lines[-20:]))  # type: ignore[union-attr]


def test_firewall_blocks_per_session_ports(world: World) -> None:
    if not world.namespaced:
        pytest.skip("needs the namespaced topology (root)")
    res = world.sshnp(1, "echo should-not-run", timeout=90)
    assert res.returncode != 0
    assert "should-not-run" not in res.stdout
    # the device could not reach the relay's per-session port: named, not a silent hang
    assert "rendezvous" in res.stderr or "relay" in res.stderr, res.stderr[-2000:]


def test_single_port_session_reaches_the_device(world: World) -> None:
    tag = "EGRESS" + secrets.token_hex(4)
    res = sshnp443(world, f"echo {tag} $(readlink /proc/self/ns/net)")
    ok(res, world)
    assert tag in res.stdout
    assert any("single port, ESCR" in ln for ln in world.srvd.lines), \
        world.srvd.lines[-10:]  # type: ignore[union-attr]


def _squat(host: str, port: int, n_idle: int) -> tuple[list[socket.socket], list[socket.socket]]:
    idle = [socket.create_connection((host, port), timeout=5) for _ in range(n_idle)]
    hostile = []
    for payload in (b"\x16\x03\x01\x02\x00" + b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n",
                    b"00000000-0000-4000-8000-000000000000:e30=\n", b"A" * 5000):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(payload)
        hostile.append(s)
    return idle, hostile


def _read_all(s: socket.socket, timeout: float = 15) -> bytes:
    s.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(4096)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    s.close()
    return out


def test_squatters_on_the_single_port_cannot_stop_sessions(world: World) -> None:
    host, port = world.topo.relay_address, world.single_port  # type: ignore[attr-defined]
    idle, hostile = _squat(host, port, 16)
    tags = ["SQ" + secrets.token_hex(4) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda t: sshnp443(world, f"echo {t}"), tags))
    for tag, res in zip(tags, results, strict=True):
        ok(res, world)
        assert tag in res.stdout
    for s in hostile + idle:
        data = _read_all(s)
        lines = data.split(b"\n")
        assert re.fullmatch(rb"[A-Za-z0-9+/]{43}=", lines[0]), data[:200]  # the challenge
        assert b"ok" not in lines[1:], data[:200]  # nothing else but the refusal


@pytest.fixture(scope="module")
def slow_relay(world: World):  # noqa: ANN201 - Proc
    """A second srvd (as @np_eve, an ordinary atSign of this plane) that answers every
    notification 2 s late and has no single port."""
    return world.spawn_srvd(EVE, "--test-reply-delay", "2")


def two_relays(world: World, *extra: str) -> list[str]:
    argv = world.sshnp_argv(1, "--443", *extra, quiet=False)
    argv[argv.index("-r") + 1] = f"{EVE},{RELAY}"  # the slow one first
    return argv


def test_several_relays_the_fastest_is_used(world: World, slow_relay) -> None:  # noqa: ANN001
    """Point 5: ``-r slow,fast`` measures both (discover probe) and uses the fast one first;
    the slow one is listed first, so the ordered fallback would have asked it first."""
    slow = slow_relay
    argv = two_relays(world)
    tag = "FAST" + secrets.token_hex(4)
    res = run_timed(argv + [f"echo {tag}"], env=world.client_env(), timeout=90)
    ok(res, world)
    assert tag in res.stdout
    measured = [ln for ln in res.stderr.splitlines() if "relays measured" in ln]
    assert measured and measured[0].endswith(f"using {RELAY}"), res.stderr[-2000:]
    print(f"\n{measured[0]}")
    # the slow relay was measured, never asked for a session
    assert not any("opened" in ln or "refused request" in ln for ln in slow.lines), \
        slow.lines[-5:]


def test_ordered_fallback_names_why_the_first_relay_refused(world: World,
                                                           slow_relay) -> None:  # noqa: ANN001
    tag = "ORD" + secrets.token_hex(4)
    res = run_timed(two_relays(world, "--relay-select", "ordered") + [f"echo {tag}"],
                    env=world.client_env(), timeout=90)
    ok(res, world)
    assert tag in res.stdout
    assert "relays measured" not in res.stderr
    # the user sees which relay refused, why, and how to fix it; then the next one is used
    refusal = [ln for ln in res.stderr.splitlines() if f"relay {EVE} refused" in ln]
    assert refusal and "start srvd with --443" in refusal[0] \
        and "trying the next relay" in refusal[0], res.stderr[-2000:]
