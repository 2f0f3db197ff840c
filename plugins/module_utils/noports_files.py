# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""File helpers shared by the noports.sshnp modules.

Why not just ``copy``/``template``: our modules compute a file's content on the target (from
options, or from a payload they unpack) and must honour check and diff mode themselves; these
helpers keep that logic (read, compare, atomic write with the final mode from the first byte,
diff dict) in one place so every module behaves the same.
"""

from __future__ import annotations

import os
import tempfile

MANAGED_MARK = "Managed by Ansible (noports.sshnp)"


def read_text(path):
    """File content as text, or None when the file does not exist."""
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None


def file_diff(path, before, after):
    """A diff dict in the shape Ansible's callbacks render (None = file absent)."""
    return {
        "before": before or "",
        "after": after or "",
        "before_header": "{} ({})".format(path, "content" if before is not None else "absent"),
        "after_header": "{} ({})".format(path, "content" if after is not None else "absent"),
    }


def write_atomic(module, path, data, mode=0o644, owner=None, group=None):
    """Write ``data`` to ``path`` via a temp file created with ``mode`` in the same directory.

    The temp file never has wider permissions than the final file (secrets stay private from
    the first byte) and the rename is atomic, so readers never see a half-written file.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if owner is not None or group is not None:
            uid = module_uid(module, owner)
            gid = module_gid(module, group)
            os.chown(tmp, uid, gid)
        os.rename(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def module_uid(module, owner):
    """uid for a user name or number (-1 = leave unchanged)."""
    if owner in (None, ""):
        return -1
    import pwd

    try:
        return int(owner)
    except ValueError:
        pass
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        module.fail_json(msg=f"user {owner!r} does not exist on the target")


def module_gid(module, group):
    """gid for a group name or number (-1 = leave unchanged)."""
    if group in (None, ""):
        return -1
    import grp

    try:
        return int(group)
    except ValueError:
        pass
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        module.fail_json(msg=f"group {group!r} does not exist on the target")


def ensure_dir(module, path, mode=0o755, owner=None, group=None):
    """Create ``path`` (and parents) if missing; True when something was created."""
    if os.path.isdir(path):
        return False
    if not module.check_mode:
        os.makedirs(path, mode)
        os.chmod(path, mode)
        if owner is not None or group is not None:
            os.chown(path, module_uid(module, owner), module_gid(module, group))
    return True


def attributes_differ(path, mode=None, owner=None, group=None, module=None):
    """True when an existing file's mode/owner/group differ from what is asked."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if mode is not None and (st.st_mode & 0o7777) != mode:
        return True
    if module is not None:
        uid = module_uid(module, owner)
        gid = module_gid(module, group)
        if uid != -1 and st.st_uid != uid:
            return True
        if gid != -1 and st.st_gid != gid:
            return True
    return False


def fix_attributes(module, path, mode=None, owner=None, group=None):
    """Apply mode/owner/group to an existing file (outside check mode)."""
    if module.check_mode:
        return
    if mode is not None:
        os.chmod(path, mode)
    if owner not in (None, "") or group not in (None, ""):
        os.chown(path, module_uid(module, owner), module_gid(module, group))


def parse_mode(module, value, default):
    """Octal mode option ('0600', '600' or an int given as octal digits) -> int."""
    if value in (None, ""):
        return default
    if isinstance(value, int):
        mode = value  # YAML 0600 arrives as the integer 384, already the mode
    else:
        try:
            mode = int(str(value), 8)
        except ValueError:
            module.fail_json(msg=f"mode must be an octal string like '0600', got {value!r}")
    if mode > 0o7777:
        module.fail_json(msg=f"mode out of range: {value!r}")
    return mode
