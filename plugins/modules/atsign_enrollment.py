#!/usr/bin/python
# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Operator side of device enrollment: one-time codes, list, approve, deny, revoke."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: atsign_enrollment
short_description: Issue one-time enrollment codes and approve, deny, list or revoke device keys
version_added: "0.2.0"
description:
  - Runs on the host holding the atSign's operator C(.atKeys) (O(keys_file)), usually the
    controller or the plane host, and talks to the atSign's atServer through the plane with
    C(noports enroll) of the installed runtime.
  - O(action=otp) issues a one-time code (valid O(ttl) seconds, at most 3600, usable once)
    for M(noports.sshnp.atsign_keys) with C(method=enroll) on a device. Register the result
    with C(no_log) and pass RV(otp) on; the code is the only thing that reaches the device.
  - O(action=approve) / O(action=deny) act on the pending enrollment of O(device_name) (or
    O(enrollment_id)); approval sends the atSign's encryption keys encrypted for that device.
  - O(action=revoke) revokes the approved enrollment of O(device_name) (or O(enrollment_id));
    the device can no longer authenticate, its atServer connections close at once and relays
    end its sessions. Already revoked is reported unchanged.
  - O(action=list) returns RV(enrollments).
author:
  - noports.sshnp developers (@noports)
attributes:
  check_mode:
    support: partial
    description: Reports what would be done without changing an enrollment.
    details: O(action=list) runs; approve, deny and revoke look the enrollment up and report
      the change; O(action=otp) issues no code.
  diff_mode:
    support: none
    description: Enrollment changes have no file diff.
  idempotent:
    support: partial
    description: O(action=otp) issues a new code every run; approve, deny and revoke change
      nothing when the enrollment is already in the wanted state.
  platform:
    support: full
    platforms: posix
    description: Any POSIX host with the noports runtime.
options:
  atsign:
    description: The atSign whose enrollments are managed.
    type: str
    required: true
  action:
    description: What to do.
    type: str
    required: true
    choices: [otp, list, approve, deny, revoke]
  device_name:
    description: The enrollment's device name (the newest matching enrollment is used).
    type: str
  enrollment_id:
    description: The enrollment id (wins over O(device_name)).
    type: str
  ttl:
    description: Seconds a code from O(action=otp) is valid (1-3600).
    type: int
    default: 3600
  keys_file:
    description: The operator's C(.atKeys) for O(atsign) (default C(~/.atsign/keys)).
    type: path
  root_domain:
    description: The plane's atDirectory as C(host:port).
    type: str
    required: true
  ca_file:
    description: CA certificate of the plane's TLS certificate (default the system store).
    type: path
  runtime_prefix:
    description: Prefix of the noports runtime; C(bin/noports) there is used.
    type: path
    default: /opt/noports
  timeout:
    description: Seconds to wait for each reply of the plane.
    type: float
    default: 30
seealso:
  - module: noports.sshnp.atsign_keys
"""

EXAMPLES = r"""
- name: A one-time code for each device (run on the operator host)
  noports.sshnp.atsign_enrollment:
    atsign: "@fleet"
    action: otp
    ttl: 3600
    root_domain: plane.example.com:6464
    ca_file: /etc/noports/ca.pem
    keys_file: /srv/operator/@fleet_key.atKeys
  delegate_to: operator.example.com
  register: otp
  no_log: true

- name: Revoke a lost device
  noports.sshnp.atsign_enrollment:
    atsign: "@fleet"
    action: revoke
    device_name: garage-pi
    root_domain: plane.example.com:6464
    keys_file: /srv/operator/@fleet_key.atKeys
"""

RETURN = r"""
otp:
  description: The one-time code (O(action=otp)). Register with C(no_log).
  returned: when O(action=otp)
  type: str
enrollment_id:
  description: The enrollment acted on.
  returned: for approve, deny and revoke
  type: str
status:
  description: The enrollment's state after the task.
  returned: for approve, deny and revoke
  type: str
enrollments:
  description: Every enrollment (id, appName, deviceName, status).
  returned: always except for O(action=otp)
  type: list
  elements: dict
"""

import json  # noqa: E402
import os  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

WANTED = {"approve": "approved", "deny": "denied", "revoke": "revoked"}
FROM = {"approve": ("pending",), "deny": ("pending",), "revoke": ("approved", "revoked")}


def noports(module, *args, data=None):
    p = module.params
    exe = os.path.join(p["runtime_prefix"], "bin", "noports")
    if not os.access(exe, os.X_OK):
        module.fail_json(msg=f"{exe} not found: install the runtime first "
                             "(noports.sshnp.noports_runtime)")
    argv = [exe, "-q", "enroll", args[0], p["atsign"], *args[1:], "--root", p["root_domain"],
            "--timeout", str(p["timeout"]), "--json"]
    if p["ca_file"]:
        argv += ["--ca", p["ca_file"]]
    if p["keys_file"]:
        argv += ["--keys", p["keys_file"]]
    rc, out, err = module.run_command(argv, data=data)
    if rc != 0:
        msg = (err or out).strip() or f"exit code {rc}"
        module.fail_json(msg=f"noports enroll {args[0]} failed: {msg}", rc=rc)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        module.fail_json(msg=f"unexpected output of noports enroll {args[0]}: {out[:200]!r}")


def pick(module, rows, action):
    p = module.params
    if p["enrollment_id"]:
        match = [r for r in rows if r.get("enrollmentId") == p["enrollment_id"]]
    elif p["device_name"]:
        match = [r for r in rows if r.get("deviceName") == p["device_name"]
                 and r.get("status") in FROM[action]]
    else:
        module.fail_json(msg=f"action={action} needs device_name or enrollment_id")
    if not match:
        module.fail_json(msg="no {} enrollment of {} matches {}".format(
            "/".join(FROM[action]), p["atsign"], p["enrollment_id"] or p["device_name"]))
    # the newest matching enrollment; an approved one wins for revoke
    match.sort(key=lambda r: (r.get("status") == "approved", 0))
    return match[-1]


def run(module):
    p = module.params
    action = p["action"]
    if action == "otp":
        if module.check_mode:
            return {"changed": True, "otp": None}
        if not 0 < p["ttl"] <= 3600:
            module.fail_json(msg=f"ttl must be 1..3600 seconds, got {p['ttl']}")
        reply = noports(module, "otp", "--ttl", str(p["ttl"]))
        return {"changed": True, "otp": reply["otp"]}
    rows = noports(module, "list")
    if action == "list":
        return {"changed": False, "enrollments": rows}
    row = pick(module, rows, action)
    eid = row["enrollmentId"]
    if row.get("status") == WANTED[action]:
        return {"changed": False, "enrollment_id": eid, "status": row["status"],
                "enrollments": rows}
    if row.get("status") not in FROM[action]:
        module.fail_json(msg=f"enrollment {eid} is {row.get('status')}; cannot {action} it")
    status = WANTED[action]
    if not module.check_mode:
        status = noports(module, action, eid)["status"]
        rows = noports(module, "list")
    return {"changed": True, "enrollment_id": eid, "status": status, "enrollments": rows}


def main():
    module = AnsibleModule(
        argument_spec=dict(
            atsign=dict(type="str", required=True),
            action=dict(type="str", required=True,
                        choices=["otp", "list", "approve", "deny", "revoke"]),
            device_name=dict(type="str"),
            enrollment_id=dict(type="str"),
            ttl=dict(type="int", default=3600),
            keys_file=dict(type="path"),
            root_domain=dict(type="str", required=True),
            ca_file=dict(type="path"),
            runtime_prefix=dict(type="path", default="/opt/noports"),
            timeout=dict(type="float", default=30.0),
        ),
        supports_check_mode=True,
    )
    module.exit_json(**run(module))


if __name__ == "__main__":
    main()
