"""The test topology itself: devices are unreachable from outside, yet can dial out.

The strong properties (firewall, separate stacks) are asserted only when namespaced (root);
the loopback fallback still checks the API and that every device sshd answers.
"""

from __future__ import annotations

import json
import random
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness.topology import (
    PREFIX,
    STATE_DIR,
    Topology,
    capture,
    cleanup_stale,
    read_banner,
    tcp_connect,
    tcp_probe,
)

pytestmark = pytest.mark.integration


def needs_ns(topo: Topology) -> None:
    if not topo.namespaced:
        pytest.skip("needs the namespaced topology (root)")

LISTEN = textwrap.dedent('''
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
    print("listening", flush=True, file=sys.stderr)
    while True:
        c, _ = s.accept(); c.sendall(b"hello\\n"); c.close()
''')


def listener(topo: Topology, ns: str | None, host: str, port: int):  # noqa: ANN201
    proc = topo.spawn_in(ns, [sys.executable, "-c", LISTEN, host, str(port)])
    proc.wait_for("listening", timeout=10)
    return proc


def test_api_shape(topology: Topology) -> None:
    assert len(topology.devices) == 2
    for i in (1, 2):
        dev = topology.device(i)
        assert dev.address == topology.device_address(i)
        assert dev.authorized_keys.exists() and dev.host_public_keys()[0].startswith("ssh-ed25519")
        assert dev.ns == topology.device_ns(i)
    if topology.namespaced:
        assert topology.relay_ns and topology.relay_ns.startswith(PREFIX)
        assert len({topology.device_address(1), topology.device_address(2),
                    topology.relay_address, topology.controller_address}) == 4


def test_sshd_answers_inside_each_device(topology: Topology) -> None:
    for dev in topology.devices:
        banner = read_banner(topology, dev.ns, "127.0.0.1", dev.ssh_port)
        assert banner.startswith("SSH-2.0-OpenSSH"), banner


def test_devices_accept_no_inbound_connection(topology: Topology) -> None:
    needs_ns(topology)
    port = random.randint(20000, 60000)
    for dev in topology.devices:
        # something really listens on every interface: only the firewall can stop us
        listener(topology, dev.ns, "0.0.0.0", port)
        assert tcp_connect(topology, dev.ns, dev.address, port) == "ok"  # lo -> eth0 address
    targets = [(dev.address, p) for dev in topology.devices for p in (22, port)]
    sources = [None, topology.relay_ns]
    with ThreadPoolExecutor(len(sources)) as pool:
        results = dict(zip(sources, pool.map(
            lambda src: tcp_probe(topology, src, targets, timeout=1.0), sources), strict=True))
    # and device to device
    results["d1->d2"] = tcp_probe(topology, topology.device_ns(1),
                                  [(topology.device_address(2), 22)], timeout=1.0)
    for src, got in results.items():
        for target, outcome in got.items():
            assert outcome in ("timeout", "refused", "EHOSTUNREACH"), (src, target, outcome)


def test_devices_can_dial_out_to_the_relay(topology: Topology) -> None:
    needs_ns(topology)
    port = random.randint(20000, 60000)
    listener(topology, topology.relay_ns, topology.relay_address, port)
    for dev in topology.devices:
        assert tcp_connect(topology, dev.ns, topology.relay_address, port) == "ok"
    assert tcp_connect(topology, None, topology.relay_address, port) == "ok"


def test_device_loopback_is_its_own_stack(topology: Topology) -> None:
    needs_ns(topology)
    # the relay namespace's 127.0.0.1:22 is not a device's sshd
    assert tcp_connect(topology, topology.relay_ns, "127.0.0.1", 22) == "refused"


LOOKUP = textwrap.dedent('''
    import asyncio, sys
    from noports.atclient.aio import lookup_secondary
    from noports.keys.ca import client_context
    host, port, ca, atsign = sys.argv[1:5]
    print(asyncio.run(lookup_secondary((host, int(port)), atsign, client_context(ca))))
''')


def test_plane_directory_answers_from_everywhere(topology: Topology, tmp_path) -> None:
    plane = topology.start_plane({}, name="probe-plane")
    try:
        plane.plane.register("@probe", 4242)
        d = plane.directory
        assert d is not None and d.host == topology.relay_address
        sources = [None] + [dev.ns for dev in topology.devices]
        for ns in sources:
            res = topology.python_in(ns, LOOKUP, d.host, str(d.port), str(plane.ca_file),
                                     "@probe")
            assert res.returncode == 0, res.stderr[-2000:]
            assert res.stdout.strip() == str((topology.relay_address, 4242))
    finally:
        plane.stop()


def test_stale_runs_are_cleaned_but_live_ones_kept(topology: Topology) -> None:
    needs_ns(topology)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    stale_id = "".join(random.choice("0123456789abcdef") for _ in range(6))
    (STATE_DIR / f"{stale_id}.json").write_text(json.dumps({"pid": 1, "pid_start": "0",
                                                             "x": 250}))
    ns = f"{PREFIX}-{stale_id}-relay"
    topology.run_in(None, ["ip", "netns", "add", ns])
    removed = cleanup_stale()
    assert stale_id in removed and topology.run_id not in removed
    listed = topology.run_in(None, ["ip", "netns", "list"]).stdout
    assert ns not in listed
    for own in topology.namespaces():
        assert own in listed
    assert (STATE_DIR / f"{topology.run_id}.json").exists()


def test_capture_sees_plaintext_when_there_is_some(topology: Topology) -> None:
    """Negative control for the "relay never sees plaintext" tests: a marker sent in clear
    to the relay namespace is found by :func:`capture`, in one packet or across segments."""
    needs_ns(topology)
    port = random.randint(20000, 60000)
    marker = b"CLEAR-" + bytes(random.choice(b"abcdef") for _ in range(12))
    code = textwrap.dedent('''
        import socket, sys
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
        s.recv(16)
        s.sendall(b"y" * 3000 + sys.argv[3].encode() + b"z" * 3000)
        s.close()
    ''')
    listener(topology, topology.relay_ns, topology.relay_address, port)
    with capture(topology.relay_ns, topology.relay_iface) as cap:
        res = topology.python_in(topology.device_ns(1), code, topology.relay_address, str(port),
                                 marker.decode())
        assert res.returncode == 0, res.stderr
    assert marker in cap
    assert any(marker in flow for flow in cap.flows().values())
    assert len(list(cap.packets())) > 3
