"""Ansible end to end, the way users will do it (tests/harness/ansible.py has the world).

1. Hosts reachable by plain SSH: ``control_plane`` + ``srvd`` on the relay namespace and
   ``sshnpd`` on two device namespaces, as root over ``ansible_connection: ssh``, with
   ``service_manager: none``; atSigns activated where they are used (CRAM secrets from the
   control plane, ``atsign_keys`` activate on the relay and the devices, ``noports atsign
   activate`` on the controller for the client). A second run reports changed=0 everywhere.
2. Every inbound connection on the devices dropped again (setup sshd stopped, drop-all
   ruleset restored): a direct TCP connect to device:22 from the controller fails.
3. A playbook whose inventory says ``ansible_connection: sshnp`` (short name): facts, command,
   copy with become, template, fetch, file and a 100-item loop all succeed, and the control
   plane saw exactly ONE rendezvous per host for the whole run (srvd's ``session ... opened``
   lines, and sshnpd's session lines, both == 1 per host), each set up by the controller
   agent (the plugin's default; its log in the control path dir).

Not root (or ``NOPORTS_TOPOLOGY=loopback``) the same phases run in the harness's loopback world
(every sshd as the current user on a high port of 127.0.0.1, login as that user, become only
as root); what needs namespaces (daemons in their namespace, the dropped TCP connect, the
ruleset, no inbound connection on the device address) is asserted only when namespaced.
test_nonroot.py runs this file as a throw-away user, so CI (root) covers both.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import jinja2
import pytest

from tests.harness.ansible import (
    CLIENT_ATSIGN,
    E2E_DIR,
    RELAY_ATSIGN,
    AnsibleE2E,
    PlaybookRun,
    ansible_tool,
    ansible_world,
    device_atsign,
    skip_reason,
)
from tests.harness.topology import want_namespaces

# timeouts only detect hangs: a loaded 2-CPU machine is several times slower than an idle one
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# two hosts in namespaces (CI, root); one in the loopback fallback, which test_nonroot.py runs
# as a throw-away user on every CI run: the non-root path, at the smallest cost
N_DEVICES = 2 if want_namespaces() else 1


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[AnsibleE2E, PlaybookRun, PlaybookRun]]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with ansible_world(tmp_path_factory.mktemp("ansible-e2e"), n_devices=N_DEVICES) as world:
        inventory = world.provision_inventory()
        first = world.playbook("provision.yml", inventory, timeout=420).check()
        second = world.playbook("provision.yml", inventory, timeout=300).check()
        print(f"provisioning over plain ssh: first run {first.seconds:.1f}s, "
              f"second run {second.seconds:.1f}s")
        yield world, first, second


def _private_key_files(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*.atKeys")}


def test_roles_over_plain_ssh_converge_and_rerun_changes_nothing(provisioned):
    world, first, second = provisioned
    hosts = {"relay", *(h.name for h in world.devices)}
    assert set(first.recap) == hosts, first.tail()
    assert all(first.recap[h]["changed"] > 0 for h in hosts), first.recap

    # idempotence in the namespaces, over plain SSH: every host changed=0
    assert set(second.recap) == hosts, second.tail()
    for host in hosts:
        assert second.recap[host]["changed"] == 0, (host, second.recap, second.tail())
        assert second.recap[host]["failed"] == second.recap[host]["unreachable"] == 0

    # the daemons run inside their namespaces (started there by the pid-file runner over ssh)
    for host in (world.relay, *world.devices) if world.topo.namespaced else ():
        for pid_file in (host.root / "run" / "noports").glob("*.pid"):
            pid = pid_file.read_text().split()[0]
            ns_of = world.topo.run_in(None, ["ip", "netns", "identify", pid]).stdout.strip()
            assert ns_of == host.ns, (pid_file, ns_of, host.ns)
    names = {p.stem for p in (world.relay.root / "run" / "noports").glob("*.pid")}
    assert names == {"noports-plane", "srvd"}, names
    for dev in world.devices:
        assert {p.stem for p in (dev.root / "run" / "noports").glob("*.pid")} == {"sshnpd"}

    # zero trust: each private key file exists only on the host that uses it
    assert _private_key_files(world.relay.root) == {f"{RELAY_ATSIGN}_key.atKeys"}
    for dev in world.devices:
        assert _private_key_files(dev.root) == {f"{device_atsign(dev.index)}_key.atKeys"}
    assert _private_key_files(world.controller_dir) == {f"{CLIENT_ATSIGN}_key.atKeys"}
    for keys in [world.client_keys(), *world.controller_dir.rglob("*.atKeys"),
                 *world.relay.root.rglob("*.atKeys"),
                 *(k for d in world.devices for k in d.root.rglob("*.atKeys"))]:
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600, keys
    # the one-time CRAM secrets never appear in the output (no_log everywhere they travel)
    for cram in (world.relay.root / "var" / "lib" / "noports" / "plane" / "cram").glob("*.cram"):
        secret = cram.read_text().strip()
        assert secret and secret not in first.output and secret not in second.output


def test_playbook_over_sshnp_with_inbound_dropped_makes_one_rendezvous_per_host(provisioned):
    world, _first, _second = provisioned

    # close the setup access: masters closed, setup sshd stopped, drop-all guard restored
    probes = world.close_inbound()
    namespaced = world.topo.namespaced
    assert probes == ({h.name: "timeout" for h in world.devices} if namespaced  # dropped,
                      else {}), probes                                          # not refused
    for h in world.devices if namespaced else ():
        rules = world.ruleset(h)
        assert "policy drop" in rules and "dport 22" not in rules, rules
        assert world.established_inbound(h) == [], world.established_inbound(h)

    # the daemons are still up (they never needed inbound connections)
    for h in world.devices:
        assert "ready" in world.sshnpd_log(h).read_text()

    inventory = world.sshnp_inventory()
    assert json.loads(inventory.read_text())["all"]["children"]["devices"]["vars"][
        "ansible_connection"] == "sshnp"  # the SHORT name, as users write it
    mark = world.log_mark()
    run = world.playbook("exercise.yml", inventory, timeout=360)
    if run.returncode != 0:  # the relay's and the devices' view of what went wrong
        logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in world.log_mark() if p.exists())
        raise AssertionError(f"sshnp run failed:\n{run.tail()}\n{logs}")
    run.check()
    print(f"sshnp run: {run.seconds:.1f}s")

    hosts = {h.name for h in world.devices}
    assert set(run.recap) == hosts, run.tail()
    for h in world.devices:
        r = run.recap[h.name]
        assert r["failed"] == 0 and r["unreachable"] == 0, (h.name, r)
        # the copy with become, the template, the work dir, the file mode, the record
        assert r["changed"] >= 4, (h.name, r, run.tail())
        record = json.loads((world.controller_dir / "fetched" / f"{h.name}.json").read_text())
        assert record["loop"] == 100 and h.address in record["eth0"], record
        assert record["become_copy_changed"] is True
        fetched = (world.controller_dir / "fetched" / f"{h.name}.motd").read_text()
        assert f"managed by noports.sshnp on {h.name}" in fetched
        copied = h.root / "tmp" / "sshnp-e2e" / "become.txt"
        assert copied.read_text() == f"hello from {h.name}\n"
        assert stat.S_IMODE(copied.stat().st_mode) == 0o600  # the file task ran after copy

    # exactly one rendezvous per host for the whole run, seen by the relay and the device
    seen = world.rendezvous_since(mark)
    counts = {name: {k: len(v) for k, v in s.items()} for name, s in seen.items()}
    print(f"rendezvous per host during the sshnp run: {counts}")
    for name, lines in seen.items():
        print(f"{name}: srvd: {lines['srvd']}\n{name}: sshnpd: {lines['sshnpd']}")
    assert counts == {h: {"srvd": 1, "sshnpd": 1} for h in hosts}, seen
    # through the plugin's default, the per-user agent in the control path dir: it set up
    # every host's tunnel (docs/agent.md), no sshnp process per host did
    agent_log = (world.cp_dir / "sshnp-agent" / "agent.log").read_text()
    assert agent_log.count(" ready in ") == len(hosts), agent_log[-3000:]

    # still no way in from outside after the run
    for h in world.devices if namespaced else ():
        assert world.established_inbound(h) == []


CONNECTION_DIR = E2E_DIR.parent / "connection"


def test_connection_playbook_pipelined_and_sftp_hosts_with_reset(provisioned):
    """tests/ansible/connection/: the plugin's own playbook (a pipelining host and a
    non-pipelining host with sftp transfers, both device 1; reset_connection) run with its
    own ansible.cfg, for real. It succeeds on both hosts; the reset is a real one (the run
    needs a rendezvous after it), and the rendezvous are all device 1's."""
    world, _first, _second = provisioned
    if os.geteuid() != 0:
        # as the throw-away user of test_nonroot.py it once stalled at Gathering Facts for
        # 300 s (on a machine under heavy load); not understood yet, so not run as non-root
        pytest.skip("the connection playbook runs as root (namespaced or loopback) only")
    dev = world.devices[0]
    out = world.base / "connection"
    out.mkdir(exist_ok=True)
    template = jinja2.Template((CONNECTION_DIR / "inventory.yml.j2").read_text())
    inventory = out / "inventory.yml"
    inventory.write_text(template.render(
        device_user=world.ssh_user, ssh_key=str(world.identity), client_atsign=CLIENT_ATSIGN,
        device_atsign=device_atsign(dev.index), device_name=dev.name, relays=[RELAY_ATSIGN],
        client_keys=str(world.client_keys()),
        root_domain=f"{world.relay.address}:{world.plane_port}",
        ca_file=str(world.controller_dir / "ca.pem"), sshnp_executable=ansible_tool("sshnp"),
        python_interpreter=sys.executable, become_method="su", work_root=str(out),
        fetch_dir=str(out / "fetched")))
    env = {"ANSIBLE_CONFIG": str(CONNECTION_DIR / "ansible.cfg")}
    mark = world.log_mark()
    # 20 loop items: the loop's point (many tasks, one master) holds; 100 without pipelining
    # is ~400 ssh sessions, too slow for the suite's budget
    run = world.playbook(CONNECTION_DIR / "test_connection.yml", inventory, "-e",
                         "loop_items=20", env=env, timeout=300).check()
    assert set(run.recap) == {"dev_pipelined", "dev_plain"}, run.tail()
    counts = {name: len(s["srvd"]) for name, s in world.rendezvous_since(mark).items()}
    print(f"connection playbook: {run.seconds:.1f}s, rendezvous per device {counts}")
    # a master opened (both hosts are one device identity, so one ControlPath), then
    # reset_connection stops it and the task after it needs a new rendezvous: at least two
    assert counts[dev.name] >= 2, counts
    assert all(n == 0 for name, n in counts.items() if name != dev.name), counts
    for host in ("dev_pipelined", "dev_plain"):
        assert f"managed by noports.sshnp on {host}" in (
            out / "fetched" / f"{host}.motd").read_text()
        assert not (out / f"sshnp-conn-{host}").exists()  # the clean-up task ran
