"""A device that boots real systemd as its PID 1, isolated from the machine running the tests.

Why so much isolation: systemd booted on the shared root filesystem once wiped the whole host
/tmp (systemd-tmpfiles) and started every service the image enables (ssh, redis, postgresql)
in the host's network (issue 14). So the device gets, before its PID 1 starts::

    ip netns exec <topology device ns>      its veth into the test topology, nftables guard
      unshare --pid --mount --uts --ipc --cgroup --fork   (mount propagation private)
        tmpfs  <base>/mnt                   (only in the new mount namespace)
        overlay <base>/mnt/root  lower=/  upper,work on that tmpfs: every write lands in RAM
        fresh tmpfs on root/tmp, root/var/tmp, root/run, root/dev (+ a few bound nodes, own
        devpts), proc (with /proc/sys read-only), sysfs read-only, cgroup2 rooted at a
        cgroup of our own (cgroup namespace), then pivot_root and exec /lib/systemd/systemd

Units that reach outside the device, or that the image enables, are masked in the overlay
before the boot (symlinks to /dev/null written into the upper layer): see :data:`MASKED`.
``container=`` in PID 1's environment makes systemd skip hardware units as it does in
systemd-nspawn. The device's own sshd (``np-sshd.service``, enabled) serves the controller's
ansible and the sessions sshnpd opens to ``localhost:22``.

Teardown (:meth:`SystemdDevice.close`, also on failure): SIGKILL to the namespace's PID 1 (the
kernel then kills every process of the PID namespace, and the mount namespace with the overlay
and its tmpfs disappears with its last process), then the cgroup directories are removed.
Nothing of the boot is ever mounted in the host's mount namespace.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

CGROUP2_HOST = [Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")]
SYSTEMD = Path("/lib/systemd/systemd")
REPO = Path(__file__).resolve().parents[2]  # the checkout: bind-mounted read-only into devices
DEVICE_REPO = Path("/opt/np-checkout")  # ... at this path


def device_path(path: str | Path) -> str:
    """Where a controller path inside the checkout (its .venv) is seen from a device."""
    p = Path(path)
    try:
        return str(DEVICE_REPO / p.relative_to(REPO))
    except ValueError:
        return str(p)
CG_PREFIX = "noports-sd-"  # our cgroups: noports-sd-<random>-<owner pid>

# What the image enables plus systemd's own units that write outside a container's reach
# (kernel sysctls, binfmt, modules) or clean directories: masked before the boot.
MASKED = [
    "ssh.service", "ssh.socket", "sshd.service", "redis-server.service", "redis.service",
    "postgresql.service", "postgresql@.service", "cron.service", "e2scrub_reap.service",
    "e2scrub_all.timer", "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
    "fstrim.timer", "man-db.timer", "logrotate.timer",
    "systemd-tmpfiles-setup.service", "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.service", "systemd-tmpfiles-clean.timer",
    "systemd-sysctl.service", "systemd-binfmt.service", "systemd-modules-load.service",
    "systemd-remount-fs.service", "systemd-timesyncd.service", "systemd-pstore.service",
    "systemd-udevd.service", "systemd-udev-trigger.service", "systemd-udev-settle.service",
    "systemd-hwdb-update.service", "systemd-random-seed.service", "getty@tty1.service",
    "getty.target", "console-getty.service", "systemd-networkd.service",
    "systemd-resolved.service", "networking.service", "systemd-firstboot.service",
    "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
    "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount", "dev-hugepages.mount", "dev-mqueue.mount",
]

SSHD_UNIT = """\
[Unit]
Description=the device's OpenSSH server (noports systemd test device)
After=network.target

[Service]
ExecStart=/usr/sbin/sshd -D -e -f /etc/ssh/np_sshd_config
RuntimeDirectory=sshd
RuntimeDirectoryPreserve=yes
Restart=on-failure
KillMode=process

[Install]
WantedBy=multi-user.target
"""

SSHD_CONFIG = """\
Port 22
ListenAddress 0.0.0.0
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
StrictModes no
AllowTcpForwarding yes
PidFile /run/np-sshd.pid
Subsystem sftp internal-sftp
"""

BOOT_SCRIPT = r"""
set -eu
M="$1"; SEED="$2"; HOSTNAME_="$3"; SHARE="$4"
R="$M/root"
mount -t tmpfs -o mode=0755,size=2g np-systemd-rw "$M"
mkdir -p "$M/upper" "$M/work" "$R"
cp -a "$SEED/." "$M/upper/"
mount -t overlay -o "lowerdir=/,upperdir=$M/upper,workdir=$M/work" np-systemd-root "$R"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/var/tmp"
# the checkout (its .venv is the runtime the roles install from), read-only, at a path outside
# /tmp: a clone under /tmp (CI's) is hidden by the device's own /tmp, and from the hardened
# units by their PrivateTmp
mkdir -p "$R/opt/np-checkout"
mount --bind "$SHARE" "$R/opt/np-checkout"
mount -o remount,bind,ro "$R/opt/np-checkout"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$R/dev"
for n in null zero full random urandom tty; do
  : > "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"
done
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
mount -t proc proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"
hostname "$HOSTNAME_"
cd "$R"
mkdir -p .np-oldroot
pivot_root . .np-oldroot
umount -l /.np-oldroot
rmdir /.np-oldroot
exec env -i container=noports-test PATH=/usr/sbin:/usr/bin:/sbin:/bin /lib/systemd/systemd \
  --log-target=console --show-status=no
"""


def skip_reason() -> str | None:
    """Why a systemd device cannot boot here (None when it can)."""
    if os.geteuid() != 0:
        return "booting systemd in its own namespaces needs root"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed"
    for tool in ("unshare", "nsenter", "pivot_root", "ip", "nft"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "overlayfs is not available (modprobe overlay)"
    if _cgroup2_root() is None:
        return "no writable cgroup2 hierarchy (/sys/fs/cgroup or /sys/fs/cgroup/unified)"
    if not Path("/usr/sbin/sshd").exists():
        return "OpenSSH sshd is not installed"
    return None


def _cgroup2_root() -> Path | None:
    for p in CGROUP2_HOST:
        if (p / "cgroup.procs").exists() and os.access(p, os.W_OK):
            return p
    return None


class SystemdDevice:
    """systemd as PID 1 of a device namespace; see the module docstring.

    ``netns`` is a named network namespace (``ip netns``) the device joins: a topology
    device's, so it has its veth into the test network. ``authorized_keys``: public keys
    root's sshd accepts (the controller's ansible key, the client's key).
    """

    def __init__(self, base: Path, netns: str, *, name: str = "np-sd",
                 authorized_keys: Sequence[str] = ()) -> None:
        self.base = base
        self.netns = netns
        self.name = name
        self.authorized_keys = list(authorized_keys)
        self.seed = base / "seed"
        self.mnt = base / "mnt"
        self.log_path = base / "boot.log"
        self.cgroup: Path | None = None
        self.popen: subprocess.Popen | None = None
        self.pid1: int | None = None  # PID 1 of the namespace, as the host sees it

    # -- boot -----------------------------------------------------------------------------
    def _write_seed(self) -> None:
        """The upper layer's initial content: masks, the device sshd, root's keys."""
        etc = self.seed / "etc"
        units = etc / "systemd" / "system"
        (units / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
        for d in (self.seed, etc, etc / "systemd", units):
            d.chmod(0o755)
        for unit in MASKED:
            os.symlink("/dev/null", units / unit)
        (units / "np-sshd.service").write_text(SSHD_UNIT)
        os.symlink("/etc/systemd/system/np-sshd.service",
                   units / "multi-user.target.wants" / "np-sshd.service")
        (etc / "ssh").mkdir(mode=0o755)
        (etc / "ssh" / "np_sshd_config").write_text(SSHD_CONFIG)
        (etc / "hostname").write_text(self.name + "\n")
        ssh = self.seed / "root" / ".ssh"
        ssh.mkdir(parents=True)
        (self.seed / "root").chmod(0o700)
        ssh.chmod(0o700)
        # the host root's shell start-up (pyenv rehash) would wait 60 s on a lock file the
        # overlay froze mid-rehash: the device's root gets a plain one
        for rc in (".bashrc", ".profile"):
            (self.seed / "root" / rc).write_text("# noports systemd test device\n")
        ak = ssh / "authorized_keys"
        ak.write_text("".join(k.strip() + "\n" for k in self.authorized_keys))
        ak.chmod(0o600)

    def boot(self, timeout: float = 90) -> None:
        """Start PID 1 and wait until ``systemctl is-system-running`` settles."""
        self.base.mkdir(parents=True, exist_ok=True)
        self._write_seed()
        self.mnt.mkdir(exist_ok=True)
        cg_root = _cgroup2_root()
        assert cg_root is not None, skip_reason()
        cleanup_stale(cg_root)
        self.cgroup = cg_root / f"{CG_PREFIX}{secrets.token_hex(3)}-{os.getpid()}"
        self.cgroup.mkdir()
        cg_procs = str(self.cgroup / "cgroup.procs")

        def enter_cgroup() -> None:  # runs in the child before exec: the cgroupns root
            with open(cg_procs, "w") as fh:
                fh.write("0")

        script = self.base / "boot.sh"
        script.write_text(BOOT_SCRIPT)
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--fork", "--pid", "--mount",
                "--uts", "--ipc", "--cgroup", "--propagation", "private", "--mount-proc",
                "/bin/sh", str(script), str(self.mnt), str(self.seed), self.name, str(REPO)]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, preexec_fn=enter_cgroup,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"systemd device exited ({self.popen.returncode}) during "
                                   f"boot:\n{self.boot_log()}")
            if self.pid1 is None:
                self.pid1 = self._find_pid1()
            elif self._is_systemd(self.pid1):
                res = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
                state = res.stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.2)
        raise RuntimeError(f"systemd device did not finish booting in {timeout:.0f} s "
                           f"(state {state!r}); jobs:\n"
                           f"{self.run(['systemctl', 'list-jobs'], check=False).stdout}\n"
                           f"{self.boot_log()}")

    def _find_pid1(self) -> int | None:
        assert self.popen is not None
        try:
            kids = Path(f"/proc/{self.popen.pid}/task/{self.popen.pid}/children").read_text()
        except OSError:
            return None
        return int(kids.split()[0]) if kids.split() else None

    @staticmethod
    def _is_systemd(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
        except OSError:
            return False

    def boot_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- running things inside ----------------------------------------------------------------
    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the device: every namespace and the root of its PID 1."""
        assert self.pid1 is not None, "not booted"
        return ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "-C",
                "-r", "-w", "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root",
                *[str(a) for a in argv]]

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30,
            input: str | None = None) -> subprocess.CompletedProcess:
        res = subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=timeout,
                             input=input, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)} in the systemd device failed "
                                 f"({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def systemctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def is_active(self, unit: str) -> str:
        return self.systemctl("is-active", unit).stdout.strip()

    def journal(self, unit: str, lines: int = 60) -> str:
        return self.run(["journalctl", "--no-pager", "-n", str(lines), "-u", unit],
                        check=False).stdout

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill the namespace's PID 1 (so all of it), then remove our cgroup directories."""
        # while unshare (its parent) lives, PID 1 is not reaped, so its pid is not reused
        if self.pid1 is not None and self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
        if self.popen is not None:
            if self.popen.poll() is None and self.pid1 is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        if self.cgroup is not None:
            _remove_cgroup(self.cgroup)
        self.pid1 = None

    def __enter__(self) -> SystemdDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cleanup_stale(cg_root: Path) -> list[str]:
    """Devices of runs whose owner died without its teardown (killed test run): SIGKILL
    every process left in their cgroup (the namespace's PID 1 first), then remove it."""
    removed = []
    for cg in cg_root.glob(f"{CG_PREFIX}*"):
        owner = cg.name.rsplit("-", 1)[-1]
        if not owner.isdigit() or Path(f"/proc/{owner}").exists():
            continue
        for procs in sorted(cg.rglob("cgroup.procs"), key=lambda p: len(p.parts)):
            with contextlib.suppress(OSError, ValueError):
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
        _remove_cgroup(cg)
        removed.append(cg.name)
    return removed


def _remove_cgroup(path: Path, timeout: float = 10) -> None:
    """rmdir a cgroup tree bottom-up once its processes are gone (bounded wait)."""
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        dirs = sorted((p for p in path.rglob("*") if p.is_dir()),
                      key=lambda p: len(p.parts), reverse=True)
        for d in [*dirs, path]:
            with contextlib.suppress(OSError):
                d.rmdir()
        if path.exists():
            time.sleep(0.1)


@contextlib.contextmanager
def systemd_device(base: Path, netns: str, **kw) -> Iterator[SystemdDevice]:
    """A booted :class:`SystemdDevice`, torn down on exit whatever happened."""
    dev = SystemdDevice(base, netns, **kw)
    try:
        dev.boot()
        yield dev
    finally:
        dev.close()


__all__ = ["MASKED", "SystemdDevice", "skip_reason", "systemd_device"]
