"""`make demo`: Ansible over SSH No Ports against devices that have no open port.

One command, from a fresh checkout. Step by step (progress on stderr, numbered):

1. a "no open ports" world: as root, a relay network namespace and N device namespaces on a
   bridge, each device dropping every inbound connection (nftables); OpenSSH sshd inside each
   device on its own 127.0.0.1:22. Not root (or ``NOPORTS_TOPOLOGY=loopback``): the loopback
   fallback, sshd per device as the current user on a free high port;
2. setup access over plain SSH: a temporary sshd on each device's address (and a hole for
   tcp/22 from the controller in its firewall), an sshd on the relay;
3. OUR roles deployed with ``ansible-playbook`` over plain SSH (``service_manager: none``):
   ``noports.sshnp.control_plane`` + ``noports.sshnp.srvd`` on the relay, ``noports.sshnp.sshnpd``
   on every device; each atSign activated on the host that uses it;
4. inbound closed again: setup sshd stopped, the drop-all firewall restored;
5. the main job: ``demo/site.yml`` with ``ansible_connection: sshnp`` against every device;
6. proof that no device has a reachable open port: TCP connects from the controller to each
   device's address (port 22, every port something listens on inside the device, a few
   others) all fail, and ``ss -ltnp`` inside each device shows sshd on 127.0.0.1 only;
7. clean-up: ssh masters, the daemons the roles started, sshd, namespaces, temp dir. Also on
   Ctrl-C / SIGTERM (the first signal starts the clean-up; further ones are ignored until it
   ends, which is bounded).

Then one summary line on stdout: hosts reached, task counts, rendezvous, open ports, time.

Why it imports the test harness: the world above is exactly what the end-to-end test builds
(tests/harness/topology.py: namespaces, nftables guard, stale-run clean-up; and
tests/harness/ansible.py: setup access, inventories, the loopback variant, the provisioning
playbook tests/ansible/e2e/provision.yml, rendezvous counting from the daemons' logs). Composing
those pieces keeps this script small and means the demo shows what CI proves, not a look-alike.
It lives in demo/, beside its playbook, not in the ``noports`` package (which ships to devices
and never imports tests/), and runs from the repository root as ``python -m demo.run`` (what
``make demo`` does), so ``tests.harness`` imports without any path set-up (docs/decisions/0016).
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.harness.ansible import (
    CLIENT_ATSIGN,
    E2E_DIR,
    RELAY_ATSIGN,
    PlaybookRun,
    ansible_tool,
    ansible_world,
    device_atsign,
    kill_group,
    parse_recap,
    pids_mentioning,
    skip_reason,
    stop_role_daemons,
)
from tests.harness.topology import read_banner, tcp_probe, want_namespaces

DEMO_DIR = Path(__file__).resolve().parent
TOTAL_STEPS = 7
OTHER_PORTS = (80, 443, 2222, 6464, 8080)  # probed on every device besides 22 and its listeners


class DemoError(Exception):
    """A step failed; the message says which and why."""


# --------------------------------------------------------------------------- output


def say(text: str, *, out: bool = False, end: str = "\n") -> None:
    """A line on stderr (progress) or stdout (proof, summary). A closed pipe (``| head``)
    must not stop the clean-up, so write errors are ignored."""
    with contextlib.suppress(OSError, ValueError):
        print(text, end=end, file=sys.stdout if out else sys.stderr, flush=True)


def step(n: int, text: str) -> None:
    say(f"[{n}/{TOTAL_STEPS}] {text}")


def detail(text: str) -> None:
    say(f"      {text}")


# --------------------------------------------------------------------------- signals


class _Signals:
    """SIGINT/SIGTERM/SIGHUP -> KeyboardInterrupt once; later signals are ignored, so the
    clean-up that the first one starts runs to its (bounded) end."""

    def __init__(self) -> None:
        self.got: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.got is not None:
            return
        self.got = signum
        raise KeyboardInterrupt


# --------------------------------------------------------------------------- ansible runs

_TASK = re.compile(r"^TASK \[(.+?)\] \*")
_PLAY = re.compile(r"^PLAY \[(.+?)\] \*")
_RESULT = re.compile(r"^(ok|changed|fatal|failed|skipping|unreachable): \[([^\]]+)\]")


class PlaybookView:
    """Turns ansible-playbook's default output into a few lines of progress."""

    def __init__(self, *, per_task: bool) -> None:
        self.per_task = per_task
        self.task: str | None = None
        self.results: dict[str, str] = {}
        self.messages: dict[str, list[str]] = {}
        self.roles_seen: set[str] = set()
        self._msg_host: str | None = None

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        m = _TASK.match(line)
        if m or line.startswith("PLAY RECAP"):
            self.flush()
            self.task = m.group(1) if m else None
            if m and not self.per_task and " : " in m.group(1):
                role = m.group(1).split(" : ", 1)[0]
                if role not in self.roles_seen:
                    self.roles_seen.add(role)
                    detail(f"role {role}")
            return
        m = _PLAY.match(line)
        if m:
            self.flush()
            self.task = None
            detail(f"play: {m.group(1)}")
            return
        m = _RESULT.match(line)
        if m and self.task:
            status, host = m.group(1), m.group(2).split(" -> ")[0]
            rank = ["skipping", "ok", "changed", "failed", "fatal", "unreachable"]
            old = self.results.get(host)
            if old is None or rank.index(status if status in rank else "ok") > rank.index(old):
                self.results[host] = status
            self._msg_host = host if "=>" in line else None
            if status in ("fatal", "failed", "unreachable"):
                detail(line[:300])
            return
        if self._msg_host and line.startswith("  "):
            item = line.strip()
            if item.startswith("- "):
                self.messages.setdefault(self._msg_host, []).append(item[2:])
        elif not line.startswith("  "):
            self._msg_host = None

    def flush(self) -> None:
        if self.per_task and self.task and self.results:
            hosts = ", ".join(f"{h} {s}" for h, s in sorted(self.results.items()))
            detail(f"{self.task}: {hosts}")
            for h, items in sorted(self.messages.items()):
                detail(f"    {h}: {' '.join(items)}")
        self.results, self.messages, self._msg_host = {}, {}, None


class Runner:
    """ansible-playbook in its own process group, output streamed through a PlaybookView."""

    def __init__(self, world, log_dir: Path, verbose: bool) -> None:  # noqa: ANN001
        self.world = world
        self.log_dir = log_dir
        self.verbose = verbose
        self.current: subprocess.Popen | None = None

    def run(self, playbook: Path, inventory: Path, *, per_task: bool, timeout: float,
            env: dict[str, str] | None = None):
        argv = [ansible_tool("ansible-playbook"), "-i", str(inventory), str(playbook)]
        view = PlaybookView(per_task=per_task)
        lines: list[str] = []
        t0 = time.monotonic()
        self.current = proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=self.world.env(**(env or {})), cwd=str(playbook.parent),
            start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # ends when ansible-playbook exits
                lines.append(line)
                if self.verbose:
                    say(line, end="")
                else:
                    view.feed(line)
                if time.monotonic() - t0 > timeout:
                    raise DemoError(f"{playbook.name} did not finish within {timeout:.0f} s")
            proc.wait(timeout=30)
        finally:
            self.stop()
        out = "".join(lines)
        (self.log_dir / f"{playbook.stem}.log").write_text(out)
        run = PlaybookRun(argv, proc.returncode, out, time.monotonic() - t0, parse_recap(out))
        self.world.runs.append(run)
        return run

    def stop(self) -> None:
        proc, self.current = self.current, None
        if proc is not None and proc.poll() is None:
            kill_group(proc.pid, grace=5)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)


# --------------------------------------------------------------------------- proof


def prove_no_open_port(world) -> tuple[list[str], int]:  # noqa: ANN001
    """Lines of proof and the number of device ports reachable from the controller."""
    topo = world.topo
    lines: list[str] = []
    reachable = 0
    for h in world.devices:
        if topo.namespaced:
            listeners = topo.run_in(h.ns, ["ss", "-Htlnp"]).stdout.splitlines()
            ports = {22, *OTHER_PORTS}
            local = []
            for ln in listeners:
                cols = ln.split()
                addr = cols[3]
                ports.add(int(addr.rsplit(":", 1)[1]))
                who = re.search(r'users:\(\("([^"]+)"', ln)
                local.append(f"{addr} ({who.group(1) if who else '?'})")
                if not re.match(r"^(127\.\d+\.\d+\.\d+|\[::1\]):\d+$", addr):
                    reachable += 1  # a listener that is not on loopback counts as open
            probes = tcp_probe(topo, None, [(h.address, p) for p in sorted(ports)], timeout=1.5)
            reachable += sum(1 for r in probes.values() if r == "ok")
            shown = ", ".join(f"tcp/{p} {r}" for (_a, p), r in sorted(probes.items()))
            lines.append(f"proof {h.name} {h.address}: from the controller {shown}")
            lines.append(f"proof {h.name} listening inside its namespace (ss -ltnp): "
                         f"{', '.join(local) or 'nothing'}")
            banner = read_banner(topo, h.ns, "127.0.0.1", 22)
            lines.append(f"proof {h.name} inside, 127.0.0.1:22 answers: {banner}")
        else:
            pid_file = h.root / "run" / "noports" / "sshnpd.pid"
            pid = pid_file.read_text().split()[0] if pid_file.exists() else "?"
            out = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True,
                                 timeout=20, check=False).stdout
            mine = [ln.split()[3] for ln in out.splitlines() if f"pid={pid}," in ln]
            lines.append(f"proof {h.name} (loopback fallback): sshnpd pid {pid} listens on "
                         f"{', '.join(mine) or 'nothing'} (ss -ltnp)")
            reachable += len(mine)
    return lines, reachable


# --------------------------------------------------------------------------- main


def preflight(namespaced: bool) -> None:
    why = skip_reason(namespaced)
    if why:
        raise DemoError(f"{why} (run `make bootstrap` as root, or apt-get install "
                        "openssh-server openssh-client nftables iproute2; `ssh-keygen -A`)")


def run_demo(args: argparse.Namespace, signals: _Signals) -> int:
    started = time.monotonic()
    n = args.devices
    forced = os.environ.get("NOPORTS_TOPOLOGY", "").lower() == "loopback"
    namespaced = want_namespaces()
    preflight(namespaced)

    base: Path | None = None
    world = runner = None
    try:
        base = Path(tempfile.mkdtemp(prefix="noports-demo-"))
        os.chmod(base, 0o755)  # sshd (privilege-separated) reads files below it
        say(f"demo: work dir {base}")
        if namespaced:
            step(1, f"building the world: a relay namespace and {n} device namespaces, every "
                    "device dropping all inbound connections (nftables)")
        else:
            why = "NOPORTS_TOPOLOGY=loopback" if forced else "not root"
            step(1, f"building the world ({why}: loopback fallback): {n} devices with sshd "
                    f"as {getpass.getuser()} on high ports of 127.0.0.1, no namespaces")
        with ansible_world(base, n, namespaced=namespaced) as world:
            runner = Runner(world, base, args.verbose)
            try:
                ok, summary = main_job(world, runner, namespaced)
            finally:
                signals.got = signals.got or -1  # clean-up starts: no more interruptions
                step(7, "cleaning up: ssh masters, the daemons the roles started, sshd, "
                        + ("namespaces, " if namespaced else "") + "temp dir")
                runner.stop()
                stop_role_daemons(world)
    except KeyboardInterrupt:
        sig = signals.got if signals.got and signals.got > 0 else signal.SIGINT
        say(f"demo: interrupted ({signal.Signals(sig).name}), cleaned up")
        return 130
    except DemoError as exc:
        say(f"demo: FAILED: {exc}\n(re-run with -v to see all of ansible's output)")
        return 1
    finally:
        signals.got = signals.got or -1
        _final_cleanup(world, runner, base)
    say(f"demo {'OK' if ok else 'FAILED'}: {summary}, {time.monotonic() - started:.1f} s",
        out=True)
    return 0 if ok else 1


def main_job(world, runner: Runner, namespaced: bool) -> tuple[bool, str]:  # noqa: ANN001
    """Steps 1 (details) to 6; returns (success, summary)."""
    topo = world.topo
    n = len(world.devices)
    say(f"demo: run id {topo.run_id}")
    if namespaced:
        detail(f"controller {topo.controller_address} (this namespace), relay {topo.relay_ns} "
               f"{topo.relay_address}")
        for h in world.devices:
            detail(f"device {h.name}: {h.ns} {h.address}, sshd on 127.0.0.1:22 inside")
    else:
        for dev, h in zip(topo.devices, world.devices, strict=True):
            detail(f"device {h.name}: sshd on 127.0.0.1:{dev.ssh_port}")

    step(2, "setup access over plain SSH: " + (
        "a temporary sshd on each device's address and a hole for tcp/22 from the controller "
        "in its firewall; sshd on the relay" if namespaced else
        "the devices' sshd and one on the relay, as this user"))
    inventory = world.provision_inventory()
    detail(f"inventory {inventory.name}: ansible_connection ssh, {n} devices + relay")

    step(3, "deploying with OUR roles over plain SSH (ansible-playbook, service_manager none): "
            f"control_plane + srvd on the relay, sshnpd on {n} devices")
    prov = runner.run(E2E_DIR / "provision.yml", inventory, per_task=False, timeout=300)
    _check(prov, "provisioning (tests/ansible/e2e/provision.yml)")
    detail("recap: " + "; ".join(f"{h} ok={r['ok']} changed={r['changed']}"
                                 for h, r in sorted(prov.recap.items()))
           + f" ({prov.seconds:.0f} s)")
    detail(f"atSigns (each activated on its own host): relay {RELAY_ATSIGN}, client "
           f"{CLIENT_ATSIGN}, devices " + ", ".join(device_atsign(h.index) for h in world.devices))

    step(4, "closing inbound again: setup sshd stopped, drop-all firewall restored"
         if namespaced else "closing the setup SSH connections (loopback: no firewall)")
    for name, result in sorted(world.close_inbound().items()):
        detail(f"{name}: TCP connect from the controller to its address:22 -> {result}")

    step(5, "the main job: ansible-playbook demo/site.yml, inventory says "
            "ansible_connection: sshnp")
    mark = world.log_mark()
    # generous rendezvous timeouts (client defaults: relay 20 s, daemon 15 s): a demo on a
    # busy CI machine should be slow rather than fail
    job = runner.run(DEMO_DIR / "site.yml", world.sshnp_inventory(), per_task=True, timeout=240,
                     env={"ANSIBLE_SSHNP_RELAY_TIMEOUT": "40", "ANSIBLE_SSHNP_DAEMON_TIMEOUT": "40"})
    seen = world.rendezvous_since(mark)
    rv_srvd = sum(len(s["srvd"]) for s in seen.values())
    rv_dev = sum(len(s["sshnpd"]) for s in seen.values())
    _check(job, "the main job (demo/site.yml)", logs=[world.srvd_log(), *(
        world.sshnpd_log(h) for h in world.devices)], sshd=topo.devices)
    detail(f"{job.seconds:.1f} s; rendezvous seen by srvd: "
           + ", ".join(f"{h} {len(s['srvd'])}" for h, s in sorted(seen.items())))

    step(6, "proof: no device has a reachable open port")
    if not namespaced:
        detail("loopback fallback: the devices share this host's network stack, so the "
               "port-less proof needs root (network namespaces); shown instead: sshnpd itself "
               "listens on nothing")
    proof, reachable = prove_no_open_port(world)
    for line in proof:
        say(line, out=True)

    recap = job.recap
    reached = [h for h, r in recap.items() if not r.get("unreachable")]
    tot = {k: sum(r.get(k, 0) for r in recap.values())
           for k in ("ok", "changed", "failed", "unreachable")}
    ports = (f"{reachable} reachable open ports on {n} devices" if namespaced else
             f"{reachable} listening sockets of sshnpd (loopback: no port proof)")
    ok = (len(reached) == n and tot["failed"] == 0 and tot["unreachable"] == 0
          and rv_srvd == n and reachable == 0)
    summary = (f"{len(reached)}/{n} hosts reached over sshnp, tasks ok={tot['ok']} "
               f"changed={tot['changed']} failed={tot['failed']} "
               f"unreachable={tot['unreachable']}, rendezvous={rv_srvd} (sshnpd sessions="
               f"{rv_dev}) for {n} devices, {ports}, mode={'namespaces' if namespaced else 'loopback'}")
    return ok, summary


def _check(run, what: str, logs: list[Path] = (), sshd: list = ()) -> None:  # noqa: ANN001
    bad = {h: r for h, r in run.recap.items() if r.get("failed") or r.get("unreachable")}
    if run.returncode != 0 or bad or not run.recap:
        lines = run.output.rstrip().splitlines()
        errors = [ln for ln in lines if re.match(r"^(fatal|failed|ERROR|\[ERROR\])", ln)]
        tail = "\n".join(errors[-10:] + ["..."] + lines[-12:])
        for log in logs:  # what the daemons said (they run until the clean-up)
            with contextlib.suppress(OSError):
                last = log.read_text(errors="replace").rstrip().splitlines()[-8:]
                tail += f"\n--- {log.parent.parent.parent.parent.name}: {log.name} (last lines)\n"
                tail += "\n".join(last)
        for dev in sshd:
            if dev.sshd is not None:
                tail += f"\n--- box{dev.index}: sshd (last lines)\n" + "\n".join(dev.sshd.lines[-6:])
        raise DemoError(f"{what}: ansible-playbook rc={run.returncode} {bad}\n{tail}")


def _final_cleanup(world, runner, base: Path | None) -> None:  # noqa: ANN001
    """Whatever is still running after the world's own teardown, by pid; then the temp dir."""
    if base is None:
        return
    if runner is not None:
        runner.stop()
    if world is not None:
        with contextlib.suppress(Exception):
            stop_role_daemons(world)
    left = pids_mentioning(str(base))
    for pid in left:
        kill_group(pid, grace=3)
    if left:
        say(f"demo: stopped {len(left)} leftover process(es)")
    shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.run", description=__doc__.split(
        "\n\n", maxsplit=1)[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--devices", type=int, default=3, help="number of devices (1-20)")
    p.add_argument("-v", "--verbose", action="store_true", help="show all of ansible's output")
    args = p.parse_args(argv)
    if not 1 <= args.devices <= 20:
        p.error("--devices must be between 1 and 20")
    signals = _Signals()
    signals.install()
    try:
        return run_demo(args, signals)
    except KeyboardInterrupt:  # a signal before the world existed
        say("demo: interrupted")
        return 130
    except DemoError as exc:
        say(f"demo: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
