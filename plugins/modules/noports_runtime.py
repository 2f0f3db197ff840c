#!/usr/bin/python
# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Install the noports Python runtime from the collection's own payload, offline."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: noports_runtime
short_description: Install the noports runtime (sshnpd, srvd, atserver, ...) from a payload, offline
version_added: "0.1.0"
description:
  - Installs the C(noports) Python runtime under O(prefix) from a I(payload) on the host, the
    deterministic C(tar.gz) of the collection's own C(src/noports) that
    C(scripts/noports_payload.py) builds on the controller (the roles build and copy it). No
    package index, no pip and no network are needed on the host.
  - "Layout: C(<prefix>/venv) (a virtualenv made with C(--without-pip) and, by default,
    C(--system-site-packages), so distribution packages such as C(python3-cryptography) and
    C(python3-regex) provide the dependencies), C(<prefix>/lib/noports-<version>-<sha>/) (the
    code), C(<prefix>/lib/current) (symlink, switched atomically), a C(.pth) file in the venv,
    and wrapper scripts in C(<prefix>/bin) for every console script of the payload."
  - Version aware and idempotent - the installed payload's SHA-256, version and settings are
    recorded in C(<prefix>/noports-runtime.json); nothing changes while they match.
  - Dependencies missing from the host can come from an offline wheelhouse (O(wheelhouse)),
    installed with the host's pip (C(python3-pip)) and C(--no-index).
  - After installing, O(required_imports) are imported with the runtime's interpreter; a
    missing one fails the task with the Debian package that provides it.
author:
  - noports.sshnp developers (@noports)
attributes:
  check_mode:
    support: full
    description: Reads the payload and reports whether it would be installed.
  diff_mode:
    support: full
    description: Shows the install record (version, payload SHA-256, settings) before and after.
  platform:
    support: full
    platforms: posix
    description: Linux hosts with Python 3.10 or later.
options:
  src:
    description:
      - Path of the payload C(tar.gz) on the host. Required with O(state=present).
    type: path
  prefix:
    description: Installation prefix.
    type: path
    default: /opt/noports
  state:
    description: V(present) installs or updates; V(absent) removes what this module installed.
    type: str
    choices: [present, absent]
    default: present
  python:
    description:
      - Interpreter the virtualenv is created from (the runtime needs Python 3.10+).
    type: path
    default: /usr/bin/python3
  system_site_packages:
    description:
      - Let the runtime use the interpreter's packages (distribution C(python3-*) packages).
    type: bool
    default: true
  site_dirs:
    description:
      - Extra directories put on the runtime's C(sys.path) (after the code), for instance a
        vendored dependency tree.
    type: list
    elements: path
    default: []
  wheelhouse:
    description:
      - Directory of wheels on the host. Requirements of the payload whose top-level module is
        not importable are installed from it with C(pip --no-index --find-links).
    type: path
  required_imports:
    description:
      - Modules that must import with the runtime's interpreter after installation.
    type: list
    elements: str
    default: [cryptography, regex]
  scripts:
    description:
      - Console scripts to create wrappers for. Default all the payload declares.
    type: list
    elements: str
  force:
    description: Reinstall even when the recorded payload matches.
    type: bool
    default: false
notes:
  - Running daemons keep the code they loaded; restart them when this module reports a change
    (the roles notify their restart handler).
seealso:
  - module: noports.sshnp.noports_service
"""

EXAMPLES = r"""
- name: Build the payload on the controller from the collection's own copy
  ansible.builtin.command:
    argv: ["{{ ansible_playbook_python }}", "{{ role_path }}/../../scripts/noports_payload.py",
           --root, "{{ role_path }}/../..", --out, /tmp/noports-payload]
  delegate_to: localhost
  run_once: true
  changed_when: false
  register: payload

- name: Copy it to the host
  ansible.builtin.copy:
    src: "{{ (payload.stdout | from_json).path }}"
    dest: /opt/noports/share/noports-payload.tar.gz
    mode: "0644"

- name: Install the runtime
  noports.sshnp.noports_runtime:
    src: /opt/noports/share/noports-payload.tar.gz
    prefix: /opt/noports
"""

RETURN = r"""
version:
  description: Version of the installed runtime.
  returned: when state is present
  type: str
  sample: 0.1.0
sha256:
  description: SHA-256 of the installed payload.
  returned: when state is present
  type: str
  sample: 3b1f0c...
python:
  description: The runtime's interpreter.
  returned: when state is present
  type: str
  sample: /opt/noports/venv/bin/python
scripts:
  description: Wrapper scripts, by console script name.
  returned: when state is present
  type: dict
  sample: {"sshnpd": "/opt/noports/bin/sshnpd", "noports": "/opt/noports/bin/noports"}
installed:
  description: Whether this run (re)installed the code (predicted in check mode).
  returned: always
  type: bool
  sample: true
"""

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tarfile  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible_collections.noports.sshnp.plugins.module_utils import (  # noqa: E402
    noports_files as files,
)

MANIFEST = "noports-payload.json"
RECORD = "noports-runtime.json"
PTH = "noports-runtime.pth"
# requirement name -> (import name, Debian package)
KNOWN_REQUIREMENTS = {
    "cryptography": ("cryptography", "python3-cryptography"),
    "regex": ("regex", "python3-regex"),
    "paramiko": ("paramiko", "python3-paramiko"),
    "atsdk": ("at_client", None),
    "redis": ("redis", "python3-redis"),
}
_SCRIPT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENTRY = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_]\w*)$")


class RuntimeInstallError(Exception):
    """The payload or the host is unusable; the message says what to fix."""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(src):
    """The payload's manifest; checks it names console scripts safely."""
    try:
        with tarfile.open(src, "r:gz") as tar:
            member = tar.getmember(MANIFEST)
            manifest = json.loads(tar.extractfile(member).read().decode("utf-8"))
    except (OSError, KeyError, ValueError, tarfile.TarError) as exc:
        raise RuntimeInstallError(f"{src} is not a noports payload: {exc}") from None
    for name, target in manifest.get("entry_points", {}).items():
        if not _SCRIPT_NAME.match(name) or not _ENTRY.match(target):
            raise RuntimeInstallError(f"payload declares a bad console script {name!r} = {target!r}")
    if not re.match(r"^[\w.+-]+$", str(manifest.get("version", ""))):
        raise RuntimeInstallError("payload has a bad version {!r}".format(manifest.get("version")))
    return manifest


def safe_extract(src, dest):
    """Extract regular files and directories only, refusing paths that leave ``dest``."""
    with tarfile.open(src, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if member.name == MANIFEST:
                continue
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or not name.startswith("noports/"):
                raise RuntimeInstallError(f"payload member {name!r} is outside the package")
            if not (member.isfile() or member.isdir()):
                raise RuntimeInstallError(f"payload member {name!r} is not a regular file")
            target = os.path.join(dest, *parts)
            if member.isdir():
                os.makedirs(target, 0o755, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            with tar.extractfile(member) as fh, open(target, "wb") as out:
                shutil.copyfileobj(fh, out)
            os.chmod(target, 0o644)


def wrapper_text(python, name, target, version):
    module, func = target.split(":")
    return (
        f"#!{python}\n"
        f"# {files.MANAGED_MARK}: noports {version} console script {name}.\n"
        f"from {module} import {func}\n\n"
        "if __name__ == \"__main__\":\n"
        f"    raise SystemExit({func}())\n"
    )


def requirement_name(req):
    return re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0].lower()


class Installer:
    """Plans and performs one install; every write is skipped in check mode."""

    def __init__(self, module):
        self.module = module
        p = module.params
        self.p = p
        self.prefix = p["prefix"]
        self.venv = os.path.join(self.prefix, "venv")
        self.venv_python = os.path.join(self.venv, "bin", "python")
        self.lib = os.path.join(self.prefix, "lib")
        self.bin = os.path.join(self.prefix, "bin")
        self.record_path = os.path.join(self.prefix, RECORD)

    def read_record(self):
        text = files.read_text(self.record_path)
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def desired(self, manifest, sha):
        entry_points = manifest.get("entry_points", {})
        wanted = self.p["scripts"]
        if wanted is None:
            wanted = sorted(entry_points)
        unknown = sorted(set(wanted) - set(entry_points))
        if unknown:
            raise RuntimeInstallError("the payload has no console script(s) {} (it has: {})".format(", ".join(unknown), ", ".join(sorted(entry_points))))
        return {
            "version": manifest["version"], "sha256": sha,
            "python": self.p["python"],
            "system_site_packages": self.p["system_site_packages"],
            "site_dirs": list(self.p["site_dirs"]),
            "scripts": {n: entry_points[n] for n in sorted(wanted)},
            "code": "noports-{}-{}".format(manifest["version"], sha[:12]),
        }

    def tree_ok(self, want):
        """The recorded install is really there (not deleted behind our back)."""
        if not os.access(self.venv_python, os.X_OK):
            return False
        if not os.path.isfile(os.path.join(self.lib, want["code"], "noports", "__init__.py")):
            return False
        if os.path.realpath(os.path.join(self.lib, "current")) != \
                os.path.realpath(os.path.join(self.lib, want["code"])):
            return False
        for name, target in want["scripts"].items():
            text = wrapper_text(self.venv_python, name, target, want["version"])
            if files.read_text(os.path.join(self.bin, name)) != text:
                return False
        return True

    # --- the install itself -------------------------------------------------------------

    def run(self, argv, what):
        rc, out, err = self.module.run_command(argv)
        if rc != 0:
            raise RuntimeInstallError(f"{what} failed ({rc}): {(err or out).strip()}")
        return out

    def make_venv(self, want, record):
        rebuild = (record is None or record.get("python") != want["python"]
                   or record.get("system_site_packages") != want["system_site_packages"])
        if os.access(self.venv_python, os.X_OK) and not rebuild:
            return
        if not os.access(want["python"], os.X_OK):
            raise RuntimeInstallError("interpreter {} not found on the host".format(want["python"]))
        if os.path.isdir(self.venv):
            shutil.rmtree(self.venv)
        argv = [want["python"], "-m", "venv", "--without-pip"]
        if want["system_site_packages"]:
            argv.append("--system-site-packages")
        self.run(argv + [self.venv], f"creating the virtualenv {self.venv}")

    def site_packages(self):
        out = self.run([self.venv_python, "-c",
                        "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       "locating site-packages")
        return out.strip()

    def install(self, src, manifest, want, record):
        for d in (self.prefix, self.lib, self.bin):
            os.makedirs(d, 0o755, exist_ok=True)
        self.make_venv(want, record)
        code = os.path.join(self.lib, want["code"])
        staging = code + ".tmp"
        if os.path.isdir(staging):
            shutil.rmtree(staging)
        os.makedirs(staging, 0o755)
        safe_extract(src, staging)
        # bytecode now, as the daemons may run as users who cannot write here
        self.module.run_command([self.venv_python, "-m", "compileall", "-q", staging])
        if os.path.isdir(code):
            shutil.rmtree(code)
        os.rename(staging, code)
        link_tmp = os.path.join(self.lib, ".current.tmp")
        if os.path.lexists(link_tmp):
            os.unlink(link_tmp)
        os.symlink(want["code"], link_tmp)
        os.rename(link_tmp, os.path.join(self.lib, "current"))
        pth = "\n".join([os.path.join(self.lib, "current")] + want["site_dirs"]) + "\n"
        files.write_atomic(self.module, os.path.join(self.site_packages(), PTH), pth, 0o644)
        for name, target in want["scripts"].items():
            files.write_atomic(self.module, os.path.join(self.bin, name),
                               wrapper_text(self.venv_python, name, target, want["version"]),
                               0o755)
        for name in (record or {}).get("scripts", {}):
            if name not in want["scripts"]:
                self._unlink_wrapper(name)
        for entry in os.listdir(self.lib):
            path = os.path.join(self.lib, entry)
            if entry.startswith("noports-") and entry != want["code"] and os.path.isdir(path):
                shutil.rmtree(path)
        self.install_wheels(manifest)
        files.write_atomic(self.module, self.record_path,
                           json.dumps(want, indent=1, sort_keys=True) + "\n", 0o644)

    def _unlink_wrapper(self, name):
        path = os.path.join(self.bin, name)
        text = files.read_text(path)
        if text is not None and files.MANAGED_MARK in text:
            os.unlink(path)

    def missing_imports(self, names):
        if not os.access(self.venv_python, os.X_OK):
            return list(names)
        missing = []
        for name in names:
            rc, _out, _err = self.module.run_command([self.venv_python, "-c", "import " + name])
            if rc != 0:
                missing.append(name)
        return missing

    def install_wheels(self, manifest):
        wheelhouse = self.p["wheelhouse"]
        if not wheelhouse:
            return
        if not os.path.isdir(wheelhouse):
            raise RuntimeInstallError(f"wheelhouse {wheelhouse} does not exist on the host")
        needed = []
        for req in manifest.get("requires", []):
            name = requirement_name(req)
            import_name = KNOWN_REQUIREMENTS.get(name, (name.replace("-", "_"), None))[0]
            if self.missing_imports([import_name]):
                needed.append(req)
        if needed:
            self.run([self.venv_python, "-m", "pip", "install", "--no-index", "--find-links",
                      wheelhouse, "--disable-pip-version-check", "--no-input"] + needed,
                     "installing {} from the wheelhouse (needs python3-pip)".format(", ".join(needed)))

    def remove(self, record):
        for name in (record or {}).get("scripts", {}):
            self._unlink_wrapper(name)
        for path in (self.venv, self.lib):
            if os.path.isdir(path):
                shutil.rmtree(path)
        if os.path.exists(self.record_path):
            os.unlink(self.record_path)


def run(module):
    p = module.params
    inst = Installer(module)
    record = inst.read_record()
    result = {"changed": False, "installed": False}

    if p["state"] == "absent":
        present = record is not None or os.path.isdir(inst.venv) or os.path.isdir(inst.lib)
        if present:
            result["changed"] = True
            if module._diff:
                result["diff"] = files.file_diff(
                    inst.record_path, json.dumps(record, indent=1, sort_keys=True) + "\n"
                    if record else "", None)
            if not module.check_mode:
                inst.remove(record)
        return result

    if not p["src"]:
        module.fail_json(msg="state=present needs src (the payload on the host)")
    if not os.path.isfile(p["src"]):
        if module.check_mode:
            # first check-mode run of a role: the copy task that stages the payload was skipped
            result.update(changed=True, installed=True,
                          msg="payload {} not on the host yet; it would be installed".format(p["src"]))
            return result
        module.fail_json(msg="payload {} not found on the host".format(p["src"]))
    try:
        manifest = read_manifest(p["src"])
        want = inst.desired(manifest, sha256_file(p["src"]))
    except RuntimeInstallError as exc:
        module.fail_json(msg=str(exc))
    result.update(version=want["version"], sha256=want["sha256"], python=inst.venv_python,
                  scripts={n: os.path.join(inst.bin, n) for n in want["scripts"]})
    needed = p["force"] or record != want or not inst.tree_ok(want)
    if needed:
        result["changed"] = result["installed"] = True
        if module._diff:
            result["diff"] = files.file_diff(
                inst.record_path,
                json.dumps(record, indent=1, sort_keys=True) + "\n" if record else None,
                json.dumps(want, indent=1, sort_keys=True) + "\n")
        if not module.check_mode:
            try:
                inst.install(p["src"], manifest, want, record)
            except (RuntimeInstallError, OSError) as exc:
                module.fail_json(msg="installing noports {} into {} failed: {}".format(want["version"], inst.prefix, exc))
    if not module.check_mode or not needed:
        missing = inst.missing_imports(p["required_imports"])
        if missing:
            debs = sorted({KNOWN_REQUIREMENTS[m][1] for m in missing
                           if KNOWN_REQUIREMENTS.get(m, (None, None))[1]})
            module.fail_json(
                msg="the runtime in {} cannot import {}; install {} on the host, or give "
                    "wheelhouse= (offline wheels) or site_dirs=".format(
                        inst.prefix, ", ".join(missing),
                        " ".join(debs) if debs else "those Python packages"),
                missing_imports=missing, **result)
    return result


def main():
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path"),
            prefix=dict(type="path", default="/opt/noports"),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            python=dict(type="path", default="/usr/bin/python3"),
            system_site_packages=dict(type="bool", default=True),
            site_dirs=dict(type="list", elements="path", default=[]),
            wheelhouse=dict(type="path"),
            required_imports=dict(type="list", elements="str",
                                  default=["cryptography", "regex"]),
            scripts=dict(type="list", elements="str"),
            force=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    module.exit_json(**run(module))


if __name__ == "__main__":
    main()
