#!/usr/bin/python
# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Start, stop and restart a noports daemon with systemd or, without systemd, a pid file."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: noports_service
short_description: Start, stop or restart a noports daemon (systemd or a pid-file runner)
version_added: "0.1.0"
description:
  - Controls one noports daemon (C(sshnpd), C(srvd), the control plane) on hosts B(with or
    without) systemd.
  - With O(manager=systemd) it drives C(systemctl) for the unit O(name)C(.service)
    (optionally C(daemon-reload) first, and enable or disable it).
  - With O(manager=none) it runs the daemon's I(run script) (a foreground C(exec) script, the
    same contract as a runit or s6 C(run) file) detached in a new session, with its output
    appended to O(log_file), and tracks it through O(pid_file). A recorded process start time
    guards against recycled pids. Stopping sends SIGTERM to the daemon's process group (or,
    with O(kill_mode=process), to the daemon alone) and SIGKILL after O(stop_timeout) seconds.
  - O(manager=auto) picks systemd when it is PID 1 (C(/run/systemd/system) exists), else
    the runner.
  - Restarts belong in handlers (O(state=restarted)); O(state=started) never restarts a
    running daemon.
author:
  - noports.sshnp developers (@noports)
attributes:
  check_mode:
    support: full
    description: Reports what would be started or stopped without doing it.
  diff_mode:
    support: none
    description: There is no file content to show; the result says what changed.
  platform:
    support: full
    platforms: posix
    description: Linux hosts with or without systemd.
options:
  name:
    description:
      - Service name; the systemd unit is O(name)C(.service).
    type: str
    required: true
  state:
    description:
      - V(started) starts the daemon if it is not running.
      - V(stopped) stops it if it runs.
      - V(restarted) stops it if it runs, then starts it (always reports a change).
    type: str
    choices: [started, stopped, restarted]
    default: started
  manager:
    description:
      - Service manager to use; V(auto) detects systemd.
    type: str
    choices: [auto, systemd, none]
    default: auto
  enabled:
    description:
      - With systemd, whether the unit starts at boot. Ignored by the runner (it has no
        boot hook; use your init system's C(rc.local) or supervisor to call the run script).
    type: bool
  daemon_reload:
    description:
      - With systemd, run C(systemctl daemon-reload) before anything else (needed after a
        unit file changed). Reported as a change only when other actions are taken.
    type: bool
    default: false
  run_script:
    description:
      - Runner only. Absolute path of the executable run script that C(exec)s the daemon in
        the foreground. Required when the runner is used.
    type: path
  pid_file:
    description:
      - Runner only. Pid file of the daemon; C(<pid_file>.json) records its start time.
    type: path
  log_file:
    description:
      - Runner only. File the daemon's stdout and stderr are appended to (created 0640).
    type: path
  run_as_user:
    description:
      - Runner only. User the daemon runs as (the C(User=) of a unit). Needs root.
    type: str
  run_as_group:
    description:
      - Runner only. Group the daemon runs as (default the user's primary group).
    type: str
  start_wait:
    description:
      - Runner only. Seconds the daemon must stay up after start for the start to count.
        A daemon that exits earlier fails the task with the last lines of its log.
    type: float
    default: 1.0
  stop_timeout:
    description:
      - Runner only. Seconds to wait after SIGTERM before SIGKILL.
    type: float
    default: 10.0
  kill_mode:
    description:
      - Runner only. What a stop or restart signals, as systemd's C(KillMode=).
      - V(group) signals the daemon's whole process group (helpers it started stop with it).
      - V(process) signals the daemon alone, so work it handed to processes of their own
        outlives it (C(sshnpd)'s live sessions; the C(sshnpd) role uses it).
    type: str
    choices: [group, process]
    default: group
notes:
  - The runner does not restart a crashed daemon; a supervisor (runit, s6, docker's restart
    policy) can run the same run script for that. systemd units restart on failure.
seealso:
  - module: noports.sshnp.sshnpd_config
  - module: ansible.builtin.systemd_service
"""

EXAMPLES = r"""
- name: Start sshnpd without systemd (network namespace, container)
  noports.sshnp.noports_service:
    name: sshnpd
    manager: none
    run_script: /opt/noports/etc/sshnpd.run
    pid_file: /run/noports/sshnpd.pid
    log_file: /var/log/noports/sshnpd.log
    run_as_user: pi
    state: started

- name: Restart srvd (handler), systemd
  noports.sshnp.noports_service:
    name: srvd
    manager: systemd
    daemon_reload: true
    state: restarted

- name: Stop the control plane wherever it runs
  noports.sshnp.noports_service:
    name: noports-plane
    run_script: /opt/noports/etc/noports-plane.run
    pid_file: /run/noports/noports-plane.pid
    log_file: /var/log/noports/noports-plane.log
    state: stopped
"""

RETURN = r"""
manager:
  description: The service manager that was used.
  returned: always
  type: str
  sample: none
running:
  description: Whether the daemon runs after the task (predicted in check mode).
  returned: always
  type: bool
  sample: true
pid:
  description: Pid of the daemon (runner only; null when stopped or in check mode before a start).
  returned: when manager is none
  type: int
  sample: 4242
enabled:
  description: Whether the unit is enabled (systemd only).
  returned: when manager is systemd
  type: bool
  sample: true
actions:
  description: What was done, in order (C(daemon-reload), C(stop), C(start), C(enable), ...).
  returned: always
  type: list
  elements: str
  sample: [start]
"""

import shutil  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.noports.sshnp.plugins.module_utils import (  # noqa: E402
    noports_service as svc,
)


def run_runner(module, p):
    """The pid-file path: compute the actions, then do them unless in check mode."""
    for key in ("run_script", "pid_file", "log_file"):
        if not p[key]:
            module.fail_json(msg=f"{key} is required when the service manager is 'none'")
    pid = svc.read_pid(p["pid_file"])
    running = pid is not None
    actions = []
    if p["state"] == "stopped":
        if running:
            actions.append("stop")
    elif p["state"] == "restarted":
        if running:
            actions.append("stop")
        actions.append("start")
    elif not running:
        actions.append("start")
    result = {"changed": bool(actions), "manager": "none", "actions": actions,
              "running": p["state"] != "stopped", "pid": pid}
    if p["state"] == "stopped":
        result["pid"] = None
    if module.check_mode or not actions:
        if not actions:
            result["running"] = running
        return result
    try:
        if "stop" in actions:
            svc.stop(p["pid_file"], timeout=p["stop_timeout"], kill_mode=p["kill_mode"])
            result["pid"] = None
        if "start" in actions:
            result["pid"] = svc.start(p["run_script"], p["pid_file"], p["log_file"],
                                      user=p["run_as_user"], group=p["run_as_group"],
                                      start_wait=p["start_wait"])
    except (svc.RunnerError, OSError, KeyError) as exc:
        module.fail_json(msg="{}: {}".format(p["name"], exc), actions=actions)
    return result


def run_systemd(module, p):
    systemctl = module.get_bin_path("systemctl") or shutil.which("systemctl")
    if not systemctl:
        module.fail_json(msg="systemctl not found; use manager=none on hosts without systemd")
    unit = p["name"] if p["name"].endswith(".service") else p["name"] + ".service"

    def run(args):
        return module.run_command(args)

    def must(args):
        rc, out, err = run(args)
        if rc != 0:
            module.fail_json(msg="{} failed: {}".format(" ".join(args[1:]), (err or out).strip()),
                             rc=rc)

    if p["daemon_reload"] and not module.check_mode:
        must([systemctl, "daemon-reload"])
    active, enabled = svc.systemctl_state(run, systemctl, unit)
    actions = []
    if p["enabled"] is not None and p["enabled"] != enabled:
        actions.append("enable" if p["enabled"] else "disable")
    if p["state"] == "started" and not active:
        actions.append("start")
    elif p["state"] == "stopped" and active:
        actions.append("stop")
    elif p["state"] == "restarted":
        actions.append("restart")
    if not module.check_mode:
        for action in actions:
            must([systemctl, action, unit])
    result = {"changed": bool(actions), "manager": "systemd", "actions": actions,
              "running": p["state"] != "stopped" if actions else active,
              "enabled": p["enabled"] if p["enabled"] is not None else enabled}
    if p["daemon_reload"]:
        result["actions"] = ["daemon-reload"] + actions
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", default="started",
                       choices=["started", "stopped", "restarted"]),
            manager=dict(type="str", default="auto", choices=["auto", "systemd", "none"]),
            enabled=dict(type="bool"),
            daemon_reload=dict(type="bool", default=False),
            run_script=dict(type="path"),
            pid_file=dict(type="path"),
            log_file=dict(type="path"),
            run_as_user=dict(type="str"),
            run_as_group=dict(type="str"),
            start_wait=dict(type="float", default=1.0),
            stop_timeout=dict(type="float", default=10.0),
            kill_mode=dict(type="str", default="group", choices=["group", "process"]),
        ),
        supports_check_mode=True,
    )
    p = module.params
    manager = svc.detect_manager() if p["manager"] == "auto" else p["manager"]
    result = run_systemd(module, p) if manager == "systemd" else run_runner(module, p)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
