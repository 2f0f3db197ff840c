#!/usr/bin/python
# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Open or close an npt tunnel to a port on a device's side, from the machine that runs it."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: npt_tunnel
short_description: Open or close an npt tunnel to a TCP port on a NoPorts device's side
version_added: "0.1.0"
description:
  - Puts a TCP service that only a device can reach (a web UI or API on the device's own
    loopback, a service on its LAN) on a local port of the host the task runs on, through the
    NoPorts relay, with the C(npt) client. Run it on the controller (delegated to
    C(localhost)), then use the service with M(ansible.builtin.uri) or
    M(ansible.builtin.get_url) (also delegated to C(localhost)), and close the tunnel in an
    C(always:) section.
  - O(state=started) runs C(npt -x) (the tunnel stays in a background process, recorded in
    O(pid_file)) and returns the local port. A tunnel already running under O(pid_file) is
    kept (no change) and its port returned.
  - O(state=stopped) ends the process recorded in O(pid_file) (SIGTERM) if it is an C(npt)
    process, and waits until it is gone.
  - The device's C(sshnpd) must permit the target with C(--permit-open). The tunnel also ends
    by itself after O(timeout) without a connection.
author:
  - noports.sshnp developers (@noports)
attributes:
  check_mode:
    support: full
    description: Reports whether a tunnel would be opened or closed without doing it.
  diff_mode:
    support: none
    description: There is no file content to show.
  platform:
    support: full
    platforms: posix
    description: The host that runs the tunnel needs the C(npt) client (installed with C(sshnp)).
options:
  state:
    description:
      - V(started) opens the tunnel unless it runs already; V(stopped) closes it.
    type: str
    choices: [started, stopped]
    default: started
  pid_file:
    description:
      - Where the background C(npt) records its pid; identifies the tunnel between tasks. Use
        one per device (for example with C(inventory_hostname) in its name). C(<pid_file>.port)
        records the local port.
    type: path
    required: true
  client_atsign:
    description:
      - Your atSign (C(npt -f)). Required with O(state=started).
    type: str
  device_atsign:
    description:
      - The device's atSign (C(npt -t)). Required with O(state=started).
    type: str
  device:
    description:
      - The device name (C(npt -d)).
    type: str
    default: default
  relays:
    description:
      - Relay atSign(s) (C(npt -r)), tried in order. Required with O(state=started).
    type: list
    elements: str
  remote_port:
    description:
      - The port to reach, on the device's side (C(npt -p)). Required with O(state=started).
    type: int
  remote_host:
    description:
      - The host to reach as the device names it (C(npt -h)); must be in the daemon's
        C(--permit-open) list exactly as written.
    type: str
    default: localhost
  local_port:
    description:
      - Local port on 127.0.0.1; V(0) lets the system choose (see RV(port)).
    type: int
    default: 0
  timeout:
    description:
      - End the tunnel after this long without a connection (C(npt -T)), for example V(30s),
        V(5m), V(1h,30m).
    type: str
    default: 30s
  key_file:
    description:
      - Your atSign's C(.atKeys) (default C(~/.atsign/keys/<client_atsign>_key.atKeys)).
    type: path
  root_domain:
    description:
      - The atDirectory, C(host[:port]) (default C(root.atsign.org:64)).
    type: str
  ca_file:
    description:
      - PEM CA of a self-hosted plane's TLS certificates.
    type: path
  npt_executable:
    description:
      - The C(npt) client; by default C(npt) next to the Python that runs this module, else
        on C(PATH).
    type: str
    default: npt
  stop_timeout:
    description:
      - Seconds to wait for the tunnel process to end after SIGTERM (then SIGKILL).
    type: float
    default: 10.0
notes:
  - The tunnel listens on 127.0.0.1 only, on the host the task runs on.
seealso:
  - module: ansible.builtin.uri
  - module: ansible.builtin.get_url
"""

EXAMPLES = r"""
- name: Use a device's local web API during a play
  block:
    - name: Open an npt tunnel to the device's 127.0.0.1:80
      noports.sshnp.npt_tunnel:
        client_atsign: "@ops"
        device_atsign: "{{ device_atsign }}"
        device: "{{ device_name }}"
        relays: ["@myrelay"]
        remote_port: 80
        pid_file: "/tmp/npt-{{ inventory_hostname }}.pid"
      register: tunnel
      delegate_to: localhost

    - name: Read its status through the tunnel
      ansible.builtin.uri:
        url: "http://127.0.0.1:{{ tunnel.port }}/status"
        return_content: true
      delegate_to: localhost
  always:
    - name: Close the tunnel
      noports.sshnp.npt_tunnel:
        pid_file: "/tmp/npt-{{ inventory_hostname }}.pid"
        state: stopped
      delegate_to: localhost
"""

RETURN = r"""
port:
  description: The local port of the tunnel (on 127.0.0.1); null when stopped or in check mode before a start.
  returned: always
  type: int
  sample: 43117
pid:
  description: Pid of the background npt process; null when stopped or in check mode before a start.
  returned: always
  type: int
  sample: 4242
"""

import contextlib  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402


def _read_int(path):
    try:
        with open(path, encoding="utf-8") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def npt_pid(pid_file):
    """The pid in ``pid_file`` if that process is alive and is an npt client, else None."""
    pid = _read_int(pid_file)
    if pid is None or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return None
    if not any(a.endswith((b"npt", b"npt_cli")) or b"npt_cli" in a for a in argv):
        return None  # a recycled pid: never signal someone else's process
    return pid


def _npt_binary(module, name):
    if "/" in name:
        return name
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(here, os.X_OK):
        return here
    found = module.get_bin_path(name)
    if not found:
        module.fail_json(msg=f"cannot find the npt client {name!r} next to {sys.executable} or "
                         "on PATH; install the noports package (it ships sshnp and npt) or set "
                         "npt_executable")
    return found


def start(module, p):
    missing = [k for k in ("client_atsign", "device_atsign", "relays", "remote_port")
               if not p[k]]
    if missing:
        module.fail_json(msg="state=started needs " + ", ".join(missing))
    argv = [_npt_binary(module, p["npt_executable"]), "-f", p["client_atsign"],
            "-t", p["device_atsign"], "-d", p["device"], "-r", ",".join(p["relays"]),
            "-p", str(p["remote_port"]), "-h", p["remote_host"], "-l", str(p["local_port"]),
            "-T", p["timeout"], "-x", "-q", "--pid-file", p["pid_file"]]
    for flag, key in (("-k", "key_file"), ("--root-domain", "root_domain"),
                      ("--ca-file", "ca_file")):
        if p[key]:
            argv += [flag, p[key]]
    rc, out, err = module.run_command(argv)
    if rc != 0:
        lines = [ln for ln in (err or "").splitlines() if ln.strip()]
        module.fail_json(msg=lines[-1] if lines else f"npt exited with {rc}", rc=rc,
                         stderr=err)
    words = out.split()
    if not words or not words[-1].isdigit():
        module.fail_json(msg=f"npt printed no port: {out!r}", stderr=err)
    port = int(words[-1])
    with open(p["pid_file"] + ".port", "w", encoding="utf-8") as fh:
        fh.write(f"{port}\n")
    return port, _read_int(p["pid_file"])


def _running(pid):
    """True while ``pid`` exists and has not ended (a zombie waits only for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def stop(pid, p):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + p["stop_timeout"]
    while time.monotonic() < deadline:
        # its pid file goes first, then the process: wait for both (a zombie has ended)
        if npt_pid(p["pid_file"]) != pid and not _running(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", default="started", choices=["started", "stopped"]),
            pid_file=dict(type="path", required=True),
            client_atsign=dict(type="str"),
            device_atsign=dict(type="str"),
            device=dict(type="str", default="default"),
            relays=dict(type="list", elements="str"),
            remote_port=dict(type="int"),
            remote_host=dict(type="str", default="localhost"),
            local_port=dict(type="int", default=0),
            timeout=dict(type="str", default="30s"),
            key_file=dict(type="path"),
            root_domain=dict(type="str"),
            ca_file=dict(type="path"),
            npt_executable=dict(type="str", default="npt"),
            stop_timeout=dict(type="float", default=10.0),
        ),
        supports_check_mode=True,
    )
    p = module.params
    pid = npt_pid(p["pid_file"])
    if p["state"] == "stopped":
        if pid is not None and not module.check_mode:
            stop(pid, p)
            for path in (p["pid_file"], p["pid_file"] + ".port"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        module.exit_json(changed=pid is not None, port=None, pid=None)
    if pid is not None:
        module.exit_json(changed=False, port=_read_int(p["pid_file"] + ".port"), pid=pid)
    if module.check_mode:
        module.exit_json(changed=True, port=None, pid=None)
    port, pid = start(module, p)
    module.exit_json(changed=True, port=port, pid=pid)


if __name__ == "__main__":
    main()
