#!/usr/bin/python
# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Put an atSign's keys on a host: activate there (keys generated locally) or install a file."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: atsign_keys
short_description: Give a host its atSign keys (.atKeys), generated on the host itself
version_added: "0.1.0"
description:
  - Makes sure the host has a valid C(.atKeys) file for O(atsign) in O(keys_dir) (named
    C(<atsign>_key.atKeys), mode 0600).
  - O(method=activate) (zero trust, the default) generates the private keys B(on the host) and
    activates the atSign over the network with a one-time CRAM secret, by running
    C(noports atsign activate) of the installed runtime with the secret on stdin. The secret
    comes from C(noports atsign create --cram-secret-out) on the plane host (see the
    P(noports.sshnp.control_plane#role) role); only that secret and public keys cross hosts.
  - O(method=enroll) generates the device's own key B(on the host) and enrolls it with a
    one-time code (O(otp), from M(noports.sshnp.atsign_enrollment) with C(action=otp) or
    C(noports enroll otp)) by running C(noports enroll request) with the code on stdin. No
    secret of the atSign ever reaches the host; an operator approves the request
    (M(noports.sshnp.atsign_enrollment) C(action=approve)), which sends the atSign's encryption
    keys encrypted for this device only. Until then the task reports RV(action=pending) and keeps
    the pending state (0600) next to the keys; re-running it (O(otp) no longer needed) finishes.
    Each device can then be revoked on its own.
  - O(method=install) writes an existing C(.atKeys) file whose content you hold (for instance
    in Ansible Vault). Use it for atSigns activated elsewhere; the file's keys then exist in two
    places, which activation avoids.
  - An existing valid file for the atSign is kept unless O(force=true); with O(method=activate)
    the CRAM secret is then not needed, so re-runs work after the one-time secret was used.
  - A file counts as valid when it is an official-format C(.atKeys) JSON object for this
    atSign; when the runtime is installed (O(runtime_prefix)) its key pairs are also
    decrypted and checked with C(noports.keys.atkeys.load_atkeys).
  - Secrets never appear in argv, logs or the diff; the diff shows only a short SHA-256 of the
    file.
author:
  - noports.sshnp developers (@noports)
attributes:
  check_mode:
    support: full
    description: Reports whether keys would be activated or written, without contacting the plane.
  diff_mode:
    support: full
    description: Shows presence and a short SHA-256 of the keys file, never key material.
  idempotent:
    support: partial
    description: Not idempotent with O(force=true), which re-activates or rewrites every run.
  platform:
    support: full
    platforms: posix
    description: Any POSIX host; O(method=activate) needs the noports runtime.
options:
  atsign:
    description: The atSign, with or without the leading C(@).
    type: str
    required: true
  method:
    description:
      - V(activate) generates keys on the host and activates the atSign with O(cram_secret).
      - V(install) writes O(atkeys_content).
      - V(enroll) generates the device's own key on the host and enrolls it with O(otp).
    type: str
    choices: [activate, install, enroll]
    default: activate
  keys_dir:
    description:
      - Directory of the keys file (created 0700). Default C(~/.atsign/keys) of O(owner) (or of
        the user the module runs as), where the SDKs and daemons look.
    type: path
  owner:
    description: Owner of the keys file and directory (the user the daemon runs as).
    type: str
  group:
    description: Group of the keys file and directory.
    type: str
  mode:
    description: Mode of the keys file; keep it private.
    type: raw
    default: "0600"
  cram_secret:
    description:
      - One-time CRAM secret for O(method=activate). Needed only when the host has no valid keys
        yet (or O(force=true)).
    type: str
  otp:
    description:
      - One-time enrollment code for O(method=enroll) (valid at most 1 h, once). Needed only
        to start an enrollment; not to finish a pending one.
    type: str
  device_name:
    description: Name of this device's enrollment for O(method=enroll) (shown to approvers).
    type: str
  wait:
    description:
      - Seconds O(method=enroll) waits for an operator's approval before reporting
        RV(action=pending).
    type: float
    default: 0
  root_domain:
    description: The plane's atDirectory as C(host:port), for O(method=activate) and
      O(method=enroll).
    type: str
  ca_file:
    description:
      - CA certificate (on the host) the plane's TLS certificate chains to, for
        O(method=activate). Default the system trust store.
    type: path
  atkeys_content:
    description:
      - The C(.atKeys) file content for O(method=install), as a JSON string or a dict.
    type: raw
  force:
    description:
      - Replace an existing valid keys file (activate again, or write O(atkeys_content)).
        The old keys stop working for an activated atSign.
    type: bool
    default: false
  runtime_prefix:
    description:
      - Prefix of the noports runtime (M(noports.sshnp.noports_runtime)); C(bin/noports) and
        C(venv/bin/python) there are used to activate and to check key files.
    type: path
    default: /opt/noports
  timeout:
    description: Seconds to wait for the plane during activation.
    type: float
    default: 30
notes:
  - Activation consumes the CRAM secret; a second activation with the same secret fails.
seealso:
  - module: noports.sshnp.noports_runtime
"""

EXAMPLES = r"""
- name: Provision @garage_pi on the plane host, secret to a 0600 file (no keys made there)
  ansible.builtin.command:
    argv: [/opt/noports/bin/noports, atsign, create, "@garage_pi", --dir, /srv/plane,
           --cram-secret-out, /srv/plane/cram/@garage_pi.cram]
    creates: /srv/plane/cram/@garage_pi.cram
  delegate_to: plane.example.com

- name: Read the one-time secret
  ansible.builtin.slurp:
    src: /srv/plane/cram/@garage_pi.cram
  delegate_to: plane.example.com
  register: cram
  no_log: true

- name: Generate and activate the device's keys on the device
  noports.sshnp.atsign_keys:
    atsign: "@garage_pi"
    method: activate
    cram_secret: "{{ cram.content | b64decode | trim }}"
    root_domain: plane.example.com:6464
    ca_file: /etc/noports/ca.pem
    owner: pi

- name: Enroll the device's own key with a one-time code (no CRAM secret on the device)
  noports.sshnp.atsign_keys:
    atsign: "@fleet"
    method: enroll
    otp: "{{ otp.otp }}"
    device_name: "{{ inventory_hostname_short }}"
    root_domain: plane.example.com:6464
    ca_file: /etc/noports/ca.pem
    owner: pi

- name: Install keys kept in Ansible Vault
  noports.sshnp.atsign_keys:
    atsign: "@relay"
    method: install
    atkeys_content: "{{ vault_relay_atkeys }}"
    keys_dir: /var/lib/noports/keys
    owner: noports
"""

RETURN = r"""
path:
  description: The keys file.
  returned: always
  type: str
  sample: /home/pi/.atsign/keys/@garage_pi_key.atKeys
atsign:
  description: The atSign, normalised.
  returned: always
  type: str
  sample: "@garage_pi"
action:
  description: What was (or, in check mode, would be) done.
  returned: always
  type: str
  sample: activated
  choices: [none, activated, installed, enrolled, pending, attributes]
enrollment_id:
  description: The device's enrollment id (O(method=enroll)).
  returned: when O(method=enroll) ran
  type: str
valid_before:
  description: Whether a valid keys file for the atSign was there before the task.
  returned: always
  type: bool
  sample: false
"""

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.noports.sshnp.plugins.module_utils import (  # noqa: E402
    noports_atsign as atsign_rule,
)
from ansible_collections.noports.sshnp.plugins.module_utils import (  # noqa: E402
    noports_files as files,
)

REQUIRED_FIELDS = ("aesPkamPublicKey", "aesPkamPrivateKey", "aesEncryptPublicKey",
                   "aesEncryptPrivateKey", "selfEncryptionKey")

CHECK_SCRIPT = (
    "import sys\n"
    "try:\n"
    "    from noports.keys.atkeys import AtKeysError, load_atkeys\n"
    "except ImportError:\n"
    "    raise SystemExit(3)\n"
    "try:\n"
    "    load_atkeys(sys.argv[1], atsign=sys.argv[2])\n"
    "except AtKeysError as exc:\n"
    "    print(exc)\n"
    "    raise SystemExit(1)\n"
)


def normalize_atsign(text):
    """'Alice' -> '@alice': the one atSign rule (mirror in module_utils/noports_atsign)."""
    return atsign_rule.normalize_atsign(text or "")  # InvalidAtSign is a ValueError


def structural_problem(data, atsign):
    """Why ``data`` (parsed JSON) is not an .atKeys object for ``atsign``; None if it is."""
    if not isinstance(data, dict):
        return "not a JSON object"
    missing = [f for f in REQUIRED_FIELDS if not isinstance(data.get(f), str) or not data[f]]
    if missing:
        return "missing field(s) {}".format(", ".join(missing))
    named = [k for k in data if k.startswith("@")]
    if named and all(k.lower() != atsign for k in named):
        return "the file is for {}, not {}".format(", ".join(named), atsign)
    return None


def parse_content(raw):
    """atkeys_content (str or dict) -> dict; raises ValueError with a reason."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise ValueError("atkeys_content must be a JSON string or a dict")
    try:
        return json.loads(raw)
    except ValueError:
        raise ValueError("atkeys_content is not valid JSON") from None


def serialize(data):
    """Compact JSON, raw UTF-8, like the official Dart tooling writes .atKeys files."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def fingerprint(text):
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def default_keys_dir(owner):
    home = None
    if owner:
        import pwd

        try:
            home = pwd.getpwnam(owner).pw_dir
        except KeyError:
            home = None
    if home is None:
        import pwd

        home = os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
    return os.path.join(home, ".atsign", "keys")


class KeysCheck:
    """Validates keys files: structure always, full decryption when the runtime is there."""

    def __init__(self, module, runtime_prefix):
        self.module = module
        self.python = os.path.join(runtime_prefix, "venv", "bin", "python")

    def problem(self, path, atsign):
        text = files.read_text(path)
        if text is None:
            return "absent"
        try:
            data = json.loads(text)
        except ValueError:
            return "not valid JSON"
        why = structural_problem(data, atsign)
        if why:
            return why
        if os.access(self.python, os.X_OK):
            rc, out, err = self.module.run_command([self.python, "-I", "-c", CHECK_SCRIPT, path,
                                                    atsign])
            if rc == 3:
                self.module.warn(f"{self.python} cannot import noports; {path} was only checked structurally")
            elif rc != 0:
                lines = (out or err).strip().splitlines()
                return lines[-1] if lines else "rejected by noports.keys.atkeys"
        return None


def activate(module, p, atsign, keys_dir, path, exists):
    noports = os.path.join(p["runtime_prefix"], "bin", "noports")
    if not os.access(noports, os.X_OK):
        module.fail_json(msg=f"{noports} not found: install the runtime first "
                             "(noports.sshnp.noports_runtime)")
    argv = [noports, "-q", "atsign", "activate", atsign, "--root", p["root_domain"],
            "--cram-secret-file", "-", "--keys-dir", keys_dir, "--timeout", str(p["timeout"])]
    if p["ca_file"]:
        argv += ["--ca", p["ca_file"]]
    if exists:
        argv.append("--force")
    rc, out, err = module.run_command(argv, data=p["cram_secret"], binary_data=False)
    if rc != 0:
        msg = (err or out).strip() or f"exit code {rc}"
        module.fail_json(msg=f"activating {atsign} failed: {msg}", rc=rc)
    if not os.path.exists(path):
        module.fail_json(msg=f"activation reported success but {path} was not written")


def enroll(module, p, atsign, keys_dir, path):
    """`noports enroll request` on the host; returns (action, enrollment id)."""
    noports = os.path.join(p["runtime_prefix"], "bin", "noports")
    if not os.access(noports, os.X_OK):
        module.fail_json(msg=f"{noports} not found: install the runtime first "
                             "(noports.sshnp.noports_runtime)")
    state = os.path.join(keys_dir, atsign + ".enrollment.json")
    argv = [noports, "-q", "enroll", "request", atsign, "--root", p["root_domain"],
            "--device", p["device_name"], "--keys-dir", keys_dir, "--state-file", state,
            "--wait", str(p["wait"]), "--timeout", str(p["timeout"]), "--json"]
    if p["ca_file"]:
        argv += ["--ca", p["ca_file"]]
    data = None
    if not os.path.exists(state):
        if not p["otp"]:
            module.fail_json(msg=f"{atsign} has no valid keys at {path} and no pending "
                                 "enrollment; method=enroll needs otp")
        argv += ["--otp-file", "-"]
        data = p["otp"]
    rc, out, err = module.run_command(argv, data=data, binary_data=False)
    if rc != 0:
        msg = (err or out).strip() or f"exit code {rc}"
        module.fail_json(msg=f"enrolling {atsign} failed: {msg}", rc=rc)
    try:
        reply = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        module.fail_json(msg=f"unexpected output of noports enroll request: {out[:200]!r}")
    if os.path.exists(state):
        files.fix_attributes(module, state, 0o600, p["owner"], p["group"])
    return ("enrolled" if reply.get("status") == "approved" else "pending",
            reply.get("enrollmentId"))


def install(module, p, checker, atsign, keys_dir, path, text, mode):
    # check the new content before it replaces anything (full check needs the runtime)
    fd, tmp = tempfile.mkstemp(prefix=".check.", suffix=".atKeys", dir=keys_dir)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        why = checker.problem(tmp, atsign)
    finally:
        os.unlink(tmp)
    if why:
        module.fail_json(msg=f"atkeys_content is not usable for {atsign}: {why}")
    files.write_atomic(module, path, text, mode, p["owner"], p["group"])


def run(module):
    p = module.params
    try:
        atsign = normalize_atsign(p["atsign"])
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    mode = files.parse_mode(module, p["mode"], 0o600)
    if mode & 0o077:
        module.warn(f"keys file mode {mode:o} lets other users read the atSign's keys")
    keys_dir = p["keys_dir"] or default_keys_dir(p["owner"])
    path = os.path.join(keys_dir, atsign + "_key.atKeys")
    checker = KeysCheck(module, p["runtime_prefix"])
    problem = checker.problem(path, atsign)
    exists = problem != "absent"
    valid = problem is None
    before_text = files.read_text(path)
    result = {"changed": False, "path": path, "atsign": atsign, "action": "none",
              "valid_before": valid}

    new_text = None
    if p["method"] == "install":
        if p["atkeys_content"] in (None, ""):
            module.fail_json(msg="method=install needs atkeys_content")
        try:
            data = parse_content(p["atkeys_content"])
        except ValueError as exc:
            module.fail_json(msg=str(exc))
        why = structural_problem(data, atsign)
        if why:
            module.fail_json(msg=f"atkeys_content is not usable for {atsign}: {why}")
        new_text = serialize(data)
        same = False
        if before_text is not None:
            try:
                same = json.loads(before_text) == data
            except ValueError:
                same = False
        want_write = not same and (not valid or p["force"])
        if valid and not same and not p["force"]:
            module.warn(f"{path} holds other valid keys for {atsign}; kept (use force=true to replace)")
        action = "installed" if want_write else "none"
    elif p["method"] == "enroll":
        want_write = not valid or p["force"]
        if want_write:
            missing = [k for k in ("device_name", "root_domain") if not p[k]]
            if missing:
                module.fail_json(msg="method=enroll needs {}".format(" and ".join(missing)))
        action = "enrolled" if want_write else "none"
    else:
        want_write = not valid or p["force"]
        if want_write:
            missing = [k for k in ("cram_secret", "root_domain") if not p[k]]
            if missing:
                why = "" if not exists else f" (existing file: {problem})"
                module.fail_json(msg="{} has no valid keys at {}{}; method=activate needs {}".format(atsign, path, why, " and ".join(missing)))
        action = "activated" if want_write else "none"

    if want_write:
        result["changed"] = True
        result["action"] = action
        if module._diff:
            after = (f"{atsign} keys, {fingerprint(new_text)}" if new_text is not None
                     else f"{atsign} keys, generated on the host")
            unusable = "" if valid else f" (unusable: {problem})"
            before = (f"{atsign} keys, {fingerprint(before_text)}{unusable}"
                      if before_text is not None else None)
            result["diff"] = files.file_diff(path, before and before + "\n", after + "\n")
        if not module.check_mode:
            if not os.path.isdir(keys_dir):
                parent = os.path.dirname(keys_dir)
                if os.path.basename(keys_dir) == "keys" and os.path.basename(parent) == ".atsign":
                    files.ensure_dir(module, parent, 0o700, p["owner"], p["group"])
                files.ensure_dir(module, keys_dir, 0o700, p["owner"], p["group"])
            if action == "activated":
                activate(module, p, atsign, keys_dir, path, exists)
                files.fix_attributes(module, path, mode, p["owner"], p["group"])
            elif action == "enrolled":
                result["action"], result["enrollment_id"] = enroll(module, p, atsign,
                                                                   keys_dir, path)
                if result["action"] == "enrolled":
                    files.fix_attributes(module, path, mode, p["owner"], p["group"])
            else:
                install(module, p, checker, atsign, keys_dir, path, new_text, mode)
    elif files.attributes_differ(path, mode, p["owner"], p["group"], module):
        result["changed"] = True
        result["action"] = "attributes"
        files.fix_attributes(module, path, mode, p["owner"], p["group"])
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            atsign=dict(type="str", required=True),
            method=dict(type="str", default="activate",
                        choices=["activate", "install", "enroll"]),
            otp=dict(type="str", no_log=True),
            device_name=dict(type="str"),
            wait=dict(type="float", default=0.0),
            keys_dir=dict(type="path"),
            owner=dict(type="str"),
            group=dict(type="str"),
            mode=dict(type="raw", default="0600"),
            cram_secret=dict(type="str", no_log=True),
            root_domain=dict(type="str"),
            ca_file=dict(type="path"),
            atkeys_content=dict(type="raw", no_log=True),
            force=dict(type="bool", default=False),
            runtime_prefix=dict(type="path", default="/opt/noports"),
            timeout=dict(type="float", default=30.0),
        ),
        supports_check_mode=True,
    )
    module.exit_json(**run(module))


if __name__ == "__main__":
    main()
