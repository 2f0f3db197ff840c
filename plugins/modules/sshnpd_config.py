#!/usr/bin/python
# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Write sshnpd's configuration file (the daemon's ``--config`` format)."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sshnpd_config
short_description: Manage the configuration file of the sshnpd device daemon
version_added: "0.1.0"
description:
  - Writes the file C(sshnpd --config FILE) reads, in the daemon's C(key = value) format
    (canonical long-flag names, lists comma-separated, C(true)/C(false)).
  - Only the settings you give are written; the daemon's defaults apply to the others.
  - Values are checked the way the daemon checks them (atSigns, device name, C(host:port)
    lists, ports), so a bad setting fails the task instead of the daemon's start.
  - The file holds no secrets (keys live in the C(.atKeys) file named by O(key_file)).
  - The service definition (systemd unit or run script) comes from the
    P(noports.sshnp.sshnpd#role) role's templates, and
    M(noports.sshnp.noports_service) starts it; restart the daemon from a handler when this
    module reports a change.
author:
  - noports.sshnp developers (@noports)
attributes:
  check_mode:
    support: full
    description: Computes the new content and reports a change without writing.
  diff_mode:
    support: full
    description: Shows the old and new file content.
  platform:
    support: full
    platforms: posix
    description: Any POSIX host.
options:
  path:
    description: Path of the config file.
    type: path
    default: /etc/noports/sshnpd.conf
  state:
    description:
      - V(present) writes the file, V(absent) removes it.
    type: str
    choices: [present, absent]
    default: present
  owner:
    description: Owner of the file (default the user the module runs as).
    type: str
  group:
    description: Group of the file.
    type: str
  mode:
    description: Mode of the file, as an octal string.
    type: raw
    default: "0644"
  backup:
    description: Keep a timestamped copy of the previous file when it changes.
    type: bool
    default: false
  atsign:
    description:
      - The device's atSign (C(-a)). Required with O(state=present).
    type: str
  managers:
    description:
      - Client atSigns allowed to open sessions (C(-m)). Required with O(state=present).
    type: list
    elements: str
  device:
    description: Device name (C(-d)); lower-cased, whitespace becomes C(_).
    type: str
  key_file:
    description: The device's C(.atKeys) file (C(-k)); default C(~/.atsign/keys/<atsign>_key.atKeys).
    type: path
  root_domain:
    description: The atDirectory as C(host[:port]) (default C(root.atsign.org:64)).
    type: str
  ca_file:
    description: CA certificate(s) to trust for a self-hosted plane.
    type: path
  local_sshd_port:
    description: Port of the local sshd sessions are joined to.
    type: int
  permit_open:
    description: C(host:port) entries ephemeral keys may open (C(*) allowed for either part).
    type: list
    elements: str
  authorized_keys:
    description: The device user's C(authorized_keys) file that ephemeral keys go into.
    type: path
  sshd_host_keys:
    description: Glob of sshd host public keys sent to clients for pinning.
    type: str
  sshpublickey:
    description: Accept C(sshpublickey) notifications from managers (C(-s)).
    type: bool
  sshpublickey_permissions:
    description: C(authorized_keys) options for keys accepted through O(sshpublickey).
    type: str
  ephemeral_permissions:
    description: Extra C(authorized_keys) options for ephemeral keys.
    type: str
  ssh_algorithm:
    description: Algorithm of ephemeral keys.
    type: str
    choices: [ssh-ed25519, ssh-rsa]
  hide:
    description: Do not publish C(device_info)/C(username) records (C(-h)).
    type: bool
  device_group:
    description: Device group sent to a policy service.
    type: str
  ephemeral_key_ttl:
    description: Seconds an ephemeral key stays authorized.
    type: float
  max_sessions:
    description: Concurrent sessions the daemon accepts.
    type: int
  request_window:
    description:
      - Seconds a session request's timestamp may differ from the device clock, either way
        (1 to 3600; the daemon's default is 60). Older, future and late requests are refused.
    type: float
  any_client_timezone:
    description:
      - Also accept zone-less timestamps (official Dart clients) off by a whole time zone offset.
    type: bool
  storage_path:
    description:
      - Daemon storage directory; holds the replay memory (used session ids) across restarts.
      - The daemon's default is C(~/.atsign/storage/<atsign>/..sshnpd/<device>).
    type: path
  log_format:
    description: Log line format.
    type: str
    choices: [text, json]
  verbose:
    description: Debug logging.
    type: bool
seealso:
  - module: noports.sshnp.noports_service
  - module: noports.sshnp.atsign_keys
"""

EXAMPLES = r"""
- name: Configure sshnpd for a self-hosted plane
  noports.sshnp.sshnpd_config:
    path: /etc/noports/sshnpd.conf
    atsign: "@garage_pi"
    managers: ["@alice"]
    device: garage
    root_domain: plane.example.com:6464
    ca_file: /etc/noports/ca.pem
    permit_open: [localhost:22]
  notify: Restart sshnpd

- name: Remove the configuration
  noports.sshnp.sshnpd_config:
    path: /etc/noports/sshnpd.conf
    state: absent
"""

RETURN = r"""
path:
  description: The config file.
  returned: always
  type: str
  sample: /etc/noports/sshnpd.conf
settings:
  description: The settings written, normalised (atSigns lower-case with C(@), device snakified).
  returned: when state is present
  type: dict
  sample: {"atsign": "@garage_pi", "managers": ["@alice"], "device": "garage"}
content:
  description: The file content written (it contains no secrets).
  returned: when state is present
  type: str
  sample: "atsign = @garage_pi\nmanagers = @alice\n"
backup_file:
  description: The copy of the previous file, when O(backup=true) and the file changed.
  returned: changed and backup is true
  type: str
  sample: /etc/noports/sshnpd.conf.1234.2025-01-01@00:00:00~
"""

import os  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.noports.sshnp.plugins.module_utils import (  # noqa: E402
    noports_files as files,
)
from ansible_collections.noports.sshnp.plugins.module_utils import (  # noqa: E402
    noports_sshnpd as cfg,
)

HEADER = files.MANAGED_MARK + "; changes here are overwritten.\nsshnpd --config FILE"

SETTING_SPECS = dict(
    atsign=dict(type="str"),
    managers=dict(type="list", elements="str"),
    device=dict(type="str"),
    key_file=dict(type="path"),
    root_domain=dict(type="str"),
    ca_file=dict(type="path"),
    local_sshd_port=dict(type="int"),
    permit_open=dict(type="list", elements="str"),
    authorized_keys=dict(type="path"),
    sshd_host_keys=dict(type="str", no_log=False),
    sshpublickey=dict(type="bool"),
    sshpublickey_permissions=dict(type="str"),
    ephemeral_permissions=dict(type="str"),
    ssh_algorithm=dict(type="str", choices=["ssh-ed25519", "ssh-rsa"]),
    hide=dict(type="bool"),
    device_group=dict(type="str"),
    ephemeral_key_ttl=dict(type="float", no_log=False),
    max_sessions=dict(type="int"),
    request_window=dict(type="float"),
    any_client_timezone=dict(type="bool"),
    storage_path=dict(type="path"),
    log_format=dict(type="str", choices=["text", "json"]),
    verbose=dict(type="bool"),
)


def argument_spec():
    spec = dict(
        path=dict(type="path", default="/etc/noports/sshnpd.conf"),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        owner=dict(type="str"),
        group=dict(type="str"),
        mode=dict(type="raw", default="0644"),
        backup=dict(type="bool", default=False),
    )
    spec.update(SETTING_SPECS)
    return spec


def desired_content(params):
    """(settings, text) the options ask for; raises cfg.ConfigValueError on bad values."""
    settings = {name: params.get(name) for name in cfg.SETTING_NAMES}
    settings = cfg.validate(settings)
    return settings, cfg.render(settings, header=HEADER)


def run(module):
    p = module.params
    path = p["path"]
    mode = files.parse_mode(module, p["mode"], 0o644)
    before = files.read_text(path)
    result = {"changed": False, "path": path}

    if p["state"] == "absent":
        if before is not None:
            result["changed"] = True
            if module._diff:
                result["diff"] = files.file_diff(path, before, None)
            if not module.check_mode:
                if p["backup"]:
                    result["backup_file"] = module.backup_local(path)
                os.unlink(path)
        return result

    missing = [k for k in ("atsign", "managers") if not p[k]]
    if missing:
        module.fail_json(msg="state=present needs: {}".format(", ".join(missing)))
    try:
        settings, after = desired_content(p)
    except cfg.ConfigValueError as exc:
        module.fail_json(msg=str(exc))
    result["settings"] = {k: v for k, v in settings.items() if v is not None}
    result["content"] = after

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        module.fail_json(msg=f"directory {directory} does not exist")
    if before != after:
        result["changed"] = True
        if module._diff:
            result["diff"] = files.file_diff(path, before, after)
        if not module.check_mode:
            if p["backup"] and before is not None:
                result["backup_file"] = module.backup_local(path)
            files.write_atomic(module, path, after, mode, p["owner"], p["group"])
    elif files.attributes_differ(path, mode, p["owner"], p["group"], module):
        result["changed"] = True
        files.fix_attributes(module, path, mode, p["owner"], p["group"])
    return result


def main():
    module = AnsibleModule(argument_spec=argument_spec(), supports_check_mode=True)
    module.exit_json(**run(module))


if __name__ == "__main__":
    main()
