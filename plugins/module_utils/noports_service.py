# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Service control for noports daemons: systemd, or a pid-file runner where there is none.

Why a runner of our own: devices in containers, network namespaces and small distributions
often have no systemd. Every noports daemon runs in the foreground, so a *run script* (one
``exec`` line, the same contract as runit/s6 ``run`` files) plus a pid file is enough:

* start: the run script is spawned in a new session (``setsid``), stdin from /dev/null,
  stdout/stderr appended to a log file; its pid is written to the pid file (0644, atomic);
* status: the pid is alive *and* has the start time recorded next to it (``<pid file>.json``),
  so a recycled pid is never mistaken for our daemon;
* stop: SIGTERM to the process group (``kill_mode="process"``: to the daemon alone, as
  systemd's ``KillMode=process``), wait, SIGKILL after the timeout, pid files removed.

The functions take plain arguments and return plain values so they are unit-testable without
an AnsibleModule.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

SYSTEMD_RUN_DIR = "/run/systemd/system"


def detect_manager(root="/"):
    """'systemd' when systemd is PID 1 (sd_booted(3): /run/systemd/system exists), else 'none'."""
    return "systemd" if os.path.isdir(os.path.join(root, SYSTEMD_RUN_DIR.lstrip("/"))) else "none"


# --- pid-file runner ------------------------------------------------------------------------

def _proc_start_time(pid):
    """Kernel start time of ``pid`` in clock ticks (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    rest = data[data.rfind(")") + 2:].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def _is_zombie(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
    except OSError:
        return True
    return data[data.rfind(")") + 2:].split()[:1] == ["Z"]


def state_path(pid_file):
    return pid_file + ".json"


def read_pid(pid_file):
    """The running daemon's pid from ``pid_file``, or None when it is not running.

    A pid counts only if the process exists, is not a zombie and, when a state file was
    written at start, has the recorded kernel start time (guards against pid reuse).
    """
    try:
        with open(pid_file) as fh:
            pid = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 1:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    if _is_zombie(pid):
        return None
    try:
        with open(state_path(pid_file)) as fh:
            recorded = json.load(fh).get("start_time")
    except (OSError, ValueError):
        recorded = None
    if recorded is not None and _proc_start_time(pid) != recorded:
        return None
    return pid


def _write(path, text, mode=0o644):
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.rename(tmp, path)


def _log_tail(log_file, lines=10):
    try:
        with open(log_file, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            return fh.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


class RunnerError(Exception):
    """Start or stop failed; the message says why (and quotes the log's last lines)."""


def start(run_script, pid_file, log_file, user=None, group=None, start_wait=1.0, env=None,
          cwd="/"):
    """Spawn ``run_script`` detached; return its pid once it stayed up for ``start_wait`` s.

    ``user``/``group`` (names or ids) drop privileges in the child, the way ``User=`` does in
    a systemd unit. The log is opened 0640 before the switch, so the daemon cannot rotate it
    away and other users cannot read it.
    """
    if not os.access(run_script, os.X_OK):
        raise RunnerError(f"run script {run_script} is missing or not executable")
    for d in (os.path.dirname(pid_file), os.path.dirname(log_file)):
        if d and not os.path.isdir(d):
            os.makedirs(d, 0o755)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    kwargs = {}
    if user not in (None, ""):
        kwargs["user"] = user
    if group not in (None, ""):
        kwargs["group"] = group
    if user not in (None, "") and os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam(user) if not str(user).isdigit() else pwd.getpwuid(int(user))
        os.fchown(log_fd, pw.pw_uid, pw.pw_gid)
        kwargs["extra_groups"] = []
        if "group" not in kwargs:
            kwargs["group"] = pw.pw_gid
        env = dict(env if env is not None else os.environ)
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    try:
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [run_script], stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, cwd=cwd,
            close_fds=True, start_new_session=True, env=env, **kwargs)
    finally:
        os.close(log_fd)
    _write(pid_file, f"{proc.pid}\n")
    _write(state_path(pid_file), json.dumps({
        "pid": proc.pid, "start_time": _proc_start_time(proc.pid), "run_script": run_script,
        "log_file": log_file, "started": time.time()}) + "\n")
    deadline = time.monotonic() + start_wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        _remove(pid_file)
        tail = _log_tail(log_file)
        raise RunnerError("{} exited with status {} right after start; last log lines: {}".format(run_script, proc.returncode, " | ".join(tail) or "(none)"))
    return proc.pid


def _remove(pid_file):
    for p in (pid_file, state_path(pid_file)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def stop(pid_file, timeout=10.0, kill_mode="group"):
    """Stop the daemon of ``pid_file``; True when one was running.

    ``kill_mode="group"``: SIGTERM goes to the whole process group the runner created, so
    helpers the daemon spawned (``noports plane up`` runs two servers) stop with it.
    ``kill_mode="process"``: only the daemon is signalled, so what it handed work to (sshnpd's
    session host, carrying live sessions) outlives it, as with systemd's ``KillMode=process``.
    """
    if kill_mode not in ("group", "process"):
        raise RunnerError(f"unknown kill mode {kill_mode!r}")
    pid = read_pid(pid_file)
    if pid is None:
        _remove(pid_file)
        return False
    signal_daemon = _signal_group if kill_mode == "group" else _signal_one
    signal_daemon(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            break
        time.sleep(0.05)
    else:
        signal_daemon(pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
    _remove(pid_file)
    return True


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if _is_zombie(pid):
        # our own child (same module run): reap it
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _signal_one(pid, sig):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _signal_group(pid, sig):
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    try:
        if pgid == pid:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- systemd --------------------------------------------------------------------------------

def systemctl_state(run_command, systemctl, unit):
    """(active, enabled) booleans for ``unit`` as systemctl reports them."""
    rc_active, _out, _err = run_command([systemctl, "is-active", "--quiet", unit])
    rc_enabled, out, _err = run_command([systemctl, "is-enabled", unit])
    enabled = rc_enabled == 0 and out.strip() in ("enabled", "enabled-runtime", "static",
                                                  "alias", "indirect", "generated")
    return rc_active == 0, enabled
