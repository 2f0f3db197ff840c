"""``sshnpd --doctor``: check what a device needs, print each finding with what to do.

Why: "the device does not answer" has a dozen causes (keys readable by others, sshd down,
authorized_keys refused by sshd's StrictModes, a firewall in front of the atDirectory, the
wrong CA, a clock far off...). Each check below names the step, says OK/WARN/FAIL and, when
not OK, the one thing to do. The exit status is 0 when nothing FAILed, 1 otherwise.

The file-mode rules are pure functions (unit-tested); the network checks use the same code
paths as the daemon (directory lookup, TLS, PKAM, a self key's ``createdAt`` for the clock).
"""

from __future__ import annotations

import asyncio
import glob
import os
import socket
import ssl
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .config import DaemonConfig

OK, WARN, FAIL = "OK", "WARN", "FAIL"
NET_TIMEOUT_S = 8.0
CLOCK_WARN_S = 5.0


@dataclass(frozen=True)
class Finding:
    check: str
    status: str
    detail: str
    fix: str = ""

    def render(self) -> str:
        line = f"{self.status:<4} {self.check}: {self.detail}"
        return line + (f"\n     -> {self.fix}" if self.fix and self.status != OK else "")


# --- pure rules ----------------------------------------------------------------------------

def secret_file_mode(path: str, mode: int) -> Finding | None:
    """A private-key file must not be readable or writable by group or others."""
    if mode & 0o077:
        return Finding("keys", FAIL, f"{path} has mode {stat.S_IMODE(mode):04o}: group/others "
                       "can read it", f"chmod 600 {path}")
    return None


def strict_modes(path: str, mode: int, owner: int, uid: int,
                 private_group: bool = False) -> Finding | None:
    """sshd StrictModes: the file and each directory up to / owned by the user or root and
    not writable by group or others; otherwise sshd ignores authorized_keys. Group write is
    accepted when the group is the user's private group (Debian's sshd allows that)."""
    if owner not in (uid, 0):
        return Finding("authorized_keys", FAIL, f"{path} is owned by uid {owner}, not by the "
                       "user or root: sshd (StrictModes) ignores the file",
                       f"chown {uid} {path}")
    if mode & (0o002 if private_group else 0o022):
        return Finding("authorized_keys", FAIL, f"{path} has mode {stat.S_IMODE(mode):04o}: "
                       "group/others can write it, so sshd (StrictModes) refuses every key",
                       f"chmod go-w {path}")
    return None


def clock_finding(skew_s: float, window_s: float) -> Finding:
    """Requests are refused when the two clocks differ by more than the request window."""
    text = f"this device's clock is {abs(skew_s):.1f}s {'behind' if skew_s > 0 else 'ahead of'}" \
           f" the atServer's"
    if abs(skew_s) > window_s / 2:
        return Finding("clock", FAIL, text + f" (requests are refused beyond "
                       f"{window_s:g}s)", "synchronise the clock (timedatectl set-ntp true, "
                       "chrony or ntpd)")
    if abs(skew_s) > CLOCK_WARN_S:
        return Finding("clock", WARN, text, "enable NTP (timedatectl set-ntp true)")
    return Finding("clock", OK, text)


def parse_dart_date(text: str) -> float:
    """``2026-12-05 03:40:00.123Z`` (atServer metadata) -> epoch seconds."""
    t = datetime.strptime(text.strip().rstrip("Z"), "%Y-%m-%d %H:%M:%S.%f")
    return t.replace(tzinfo=timezone.utc).timestamp()


# --- local checks ----------------------------------------------------------------------------

def check_keys(cfg: DaemonConfig) -> list[Finding]:
    from noports.keys.atkeys import AtKeysError, load_atkeys
    p = cfg.keys_path
    try:
        st = p.stat()
    except OSError as exc:
        return [Finding("keys", FAIL, f"cannot read {p}: {exc.strerror}",
                        "onboard the device (at_activate) or pass -k/--key-file")]
    bad = secret_file_mode(str(p), st.st_mode)
    if bad:
        return [bad]
    try:
        load_atkeys(p, cfg.atsign)
    except (AtKeysError, OSError) as exc:
        return [Finding("keys", FAIL, f"{p}: {exc}", "use the .atKeys file of "
                        f"{cfg.atsign} (onboard again if it is lost)")]
    return [Finding("keys", OK, f"{p} (mode 0600-or-stricter, loads for {cfg.atsign})")]


def check_authorized_keys(cfg: DaemonConfig) -> list[Finding]:
    uid = os.geteuid()
    ak = cfg.authorized_keys
    out: list[Finding] = []
    paths = [ak] if ak.exists() else []
    d = ak.parent
    while True:  # the file and each directory up to /
        if d.exists():
            paths.append(d)
        if d.parent == d:
            break
        d = d.parent
    for p in paths:
        st = p.stat()
        if p != ak and stat.S_IMODE(st.st_mode) & 0o1000 and st.st_uid == 0:
            continue  # /tmp-like sticky root directories are accepted by sshd
        # the file itself: strict (it holds credentials); directories: a user private
        # group's write bit is accepted, as Debian's sshd does (0775 home directories)
        upg = p != ak and _private_group(st.st_gid, uid)
        bad = strict_modes(str(p), st.st_mode, st.st_uid, uid, upg)
        if bad:
            out.append(bad)
    if not ak.exists():
        out.append(Finding("authorized_keys", WARN, f"{ak} does not exist yet",
                           f"it is created on the first session; check that {ak.parent} "
                           "is writable by this user"))
    return out or [Finding("authorized_keys", OK, f"{ak} and its directories pass sshd's "
                                                  "StrictModes")]


def _private_group(gid: int, uid: int) -> bool:
    """The group is named after the user and has no other member (a user private group)."""
    import grp
    import pwd
    try:
        user = pwd.getpwuid(uid)
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return (group.gr_name == user.pw_name and user.pw_gid == gid
            and set(group.gr_mem) <= {user.pw_name})


def check_sshd(cfg: DaemonConfig) -> list[Finding]:
    port = cfg.local_sshd_port
    last = ""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(NET_TIMEOUT_S)
                s.connect((host, port))
                banner = s.recv(256).split(b"\n", 1)[0].decode("ascii", "replace").strip()
        except OSError as exc:
            last = exc.strerror or str(exc)
            continue
        if banner.startswith("SSH-2.0-"):
            out = [Finding("sshd", OK, f"{host}:{port} answers {banner}")]
            if not glob.glob(cfg.sshd_host_keys):
                out.append(Finding("sshd host keys", WARN, f"nothing matches "
                                   f"{cfg.sshd_host_keys}: clients cannot pin the host key",
                                   "pass --sshd-host-keys GLOB (e.g. "
                                   "/etc/ssh/ssh_host_*_key.pub)"))
            return out
        return [Finding("sshd", FAIL, f"{host}:{port} answers {banner[:40]!r}, not SSH",
                        "point --local-sshd-port at the local sshd")]
    return [Finding("sshd", FAIL, f"no sshd on localhost port {port} ({last})",
                    "start sshd (systemctl start ssh) or fix --local-sshd-port")]


def check_storage(cfg: DaemonConfig) -> list[Finding]:
    d = cfg.storage_dir
    probe = d if d.exists() else next((p for p in d.parents if p.exists()), Path("/"))
    if os.access(probe, os.W_OK | os.X_OK):
        return [Finding("storage", OK, f"{d} is writable")]
    return [Finding("storage", FAIL, f"{probe} is not writable: the replay memory cannot "
                    "be kept", "set --storage-path to a directory this user can write")]


def check_service(service: str, pid_file: Path) -> list[Finding]:
    """systemd when it is running the host, the runner's pid file otherwise."""
    if Path("/run/systemd/system").is_dir():
        import subprocess
        try:
            res = subprocess.run(["systemctl", "is-active", f"{service}.service"],
                                 capture_output=True, text=True, timeout=10, check=False)
            state = res.stdout.strip() or res.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            state = str(exc)
        if state == "active":
            return [Finding("service", OK, f"{service}.service is active")]
        return [Finding("service", FAIL, f"{service}.service is {state}",
                        f"systemctl start {service}; journalctl -u {service} says why "
                        "it stopped")]
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except (OSError, ValueError, IndexError):
        return [Finding("service", WARN, f"no running sshnpd recorded in {pid_file}",
                        "start it (noports.sshnp.noports_service or the run script), or "
                        "pass --pid-file")]
    if b"sshnpd" in cmd or b"noports.daemon" in cmd:
        return [Finding("service", OK, f"sshnpd running as pid {pid} ({pid_file})")]
    return [Finding("service", WARN, f"pid {pid} in {pid_file} is not sshnpd",
                    "remove the stale pid file and start sshnpd")]


# --- network checks --------------------------------------------------------------------------

async def check_network(cfg: DaemonConfig) -> list[Finding]:
    from noports.atclient.aio import (
        AtClient,
        AtClientError,
        AtSecondaryNotFound,
        lookup_secondary,
    )
    from noports.keys.atkeys import AtKeysError, load_atkeys
    from noports.keys.ca import client_context

    root = f"{cfg.root[0]}:{cfg.root[1]}"
    try:
        ctx = client_context(cfg.ca_file)
    except (OSError, ValueError, ssl.SSLError) as exc:
        return [Finding("TLS trust", FAIL, f"cannot load --ca-file {cfg.ca_file}: {exc}",
                        "point --ca-file at the plane's CA certificate (PEM)")]
    try:
        host, port = await lookup_secondary(cfg.root, cfg.atsign, ctx, NET_TIMEOUT_S,
                                            use_cache=False)
    except AtSecondaryNotFound:
        return [Finding("atDirectory", FAIL, f"{root} does not know {cfg.atsign}",
                        "check the atSign and --root-domain (is it registered there?)")]
    except AtClientError as exc:
        return [_net_failure("atDirectory", root, str(exc), "--root-domain")]
    out = [Finding("atDirectory", OK, f"{root} (TLS trusted): {cfg.atsign} is at "
                   f"{host}:{port}")]
    try:
        keys = load_atkeys(cfg.keys_path, cfg.atsign)
    except (AtKeysError, OSError):
        return out  # reported by the keys check
    try:
        client = await asyncio.wait_for(AtClient.connect(cfg.atsign, keys, cfg.root, ctx,
                                                         timeout=NET_TIMEOUT_S),
                                        4 * NET_TIMEOUT_S)
    except (AtClientError, OSError, asyncio.TimeoutError) as exc:
        return out + [_net_failure("atServer", f"{host}:{port}", str(exc) or "timed out",
                                   "the directory's address for the atSign")]
    try:
        out.append(Finding("atServer", OK, f"{host}:{port} authenticated {cfg.atsign}"))
        out.append(await _clock(client, cfg))
    finally:
        await client.close()
    return out


def _net_failure(check: str, where: str, err: str, setting: str) -> Finding:
    if "not trusted" in err or "CERTIFICATE_VERIFY_FAILED" in err:
        return Finding("TLS trust", FAIL, f"{where}: {err}",
                       "trust the plane's CA: --ca-file <plane>/tls/ca.pem (public atSigns: "
                       "leave --ca-file unset)")
    if "pkam" in err:
        return Finding(check, FAIL, f"{where}: {err}", "these keys are not (or no longer) "
                       "valid for the atSign: use the right .atKeys file")
    return Finding(check, FAIL, f"cannot reach {where}: {err}",
                   f"check the network/firewall towards {where} and {setting}")


async def _clock(client, cfg: DaemonConfig) -> Finding:  # noqa: ANN001 - AtClient
    """Server clock = ``createdAt`` of a short-lived self key we write now."""
    import json

    from noports.atclient import e2e
    key = e2e.self_key_str(f"doctor_{uuid.uuid4().hex[:8]}.{cfg.device}", cfg.atsign, "sshnp")
    try:
        t0 = time.time()
        await client.command(e2e.update_command(key, "clock", e2e.metadata_fragment(
            ttl_ms=60_000)), timeout=NET_TIMEOUT_S)
        t1 = time.time()
        meta = json.loads(await client.command(f"llookup:meta:{key}",
                                               timeout=NET_TIMEOUT_S))
        server = parse_dart_date(meta["createdAt"])
        await client.command(f"delete:{key}", timeout=NET_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure: say we could not tell
        return Finding("clock", WARN, f"could not read the atServer's clock: "
                       f"{type(exc).__name__}", "check the clock by hand (timedatectl)")
    return clock_finding(server - (t0 + t1) / 2, cfg.request_window)


# --- run -------------------------------------------------------------------------------------

def run_doctor(cfg: DaemonConfig, *, service: str = "sshnpd",
               pid_file: Path = Path("/run/noports/sshnpd.pid"),
               out: Callable[[str], None] = print) -> int:
    """Run every check, print the findings, return 0 (healthy) or 1."""
    findings: list[Finding] = [Finding("config", OK, f"{cfg.atsign} device {cfg.device!r}, "
                                       f"managers {','.join(cfg.managers)}")]
    for check in (check_keys, check_authorized_keys, check_sshd, check_storage):
        findings += check(cfg)
    findings += asyncio.run(check_network(cfg))
    findings += check_service(service, pid_file)
    for f in findings:
        out(f.render())
    failed = [f for f in findings if f.status == FAIL]
    out(f"sshnpd doctor: {'healthy' if not failed else f'{len(failed)} problem(s)'}"
        f" ({sum(f.status == WARN for f in findings)} warning(s))")
    return 1 if failed else 0


__all__ = ["Finding", "check_service", "clock_finding", "run_doctor", "secret_file_mode",
           "strict_modes"]
