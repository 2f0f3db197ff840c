"""rsync through the tunnel, as docs/rsync.md says: an ssh_config ``Host`` whose ProxyCommand
is ``sshnp --stdio``, with ControlMaster so that later rsync/ssh runs reuse one tunnel.

Real programs on loopback (test_client_e2e.Env: plane, srvd, sshnpd, OpenSSH sshd) and the
real ``rsync`` on both ends. A tree with nested directories, a unicode name, an empty file, a
binary file and an executable is copied and compared byte for byte (and mode bits); a second
rsync after one edit moves only that file and makes no new rendezvous (sshnpd's log).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_client_e2e import Env

from tests.harness.sshd import SSHD

pytestmark = [
    pytest.mark.integration, pytest.mark.timeout(180),
    pytest.mark.skipif(not shutil.which("rsync"),
                       reason="rsync not installed (apt-get install rsync; scripts/bootstrap.sh "
                              "installs it as root)"),
    pytest.mark.skipif(not Path(SSHD).exists() or not shutil.which("ssh"),
                       reason="OpenSSH not installed"),
]

HOST = "box1.np"  # a label: the ProxyCommand decides where the connection goes


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("rsync"))
    yield e
    e.stop()


def ssh_config(env: Env, path: Path, known_hosts: Path, cp_dir: Path) -> Path:
    """The Host block of docs/rsync.md, with this test's plane, keys and ports."""
    proxy = shlex.join([*env.sshnp_args("--stdio", "-q", "--known-hosts", str(known_hosts))])
    path.write_text(
        f"Host {HOST}\n"
        f"  User {env.user}\n"
        f"  IdentityFile {env.identity}\n"
        "  IdentitiesOnly yes\n"
        "  BatchMode yes\n"
        f"  ProxyCommand {proxy.replace('%', '%%')}\n"
        "  HostKeyAlias device_e2e/box1\n"
        f"  UserKnownHostsFile {known_hosts}\n"
        "  StrictHostKeyChecking yes\n"
        "  ControlMaster auto\n"
        f"  ControlPath {cp_dir}/%C\n"
        "  ControlPersist 60\n")
    return path


def make_tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "café" / "日本").mkdir(parents=True)
    (root / "top.txt").write_text("top\n")
    (root / "a" / "one.txt").write_text("one\n" * 1000)
    (root / "a" / "b" / "empty").write_bytes(b"")
    (root / "a" / "b" / "c" / "blob.bin").write_bytes(os.urandom(300_000))
    (root / "café" / "naïve résumé.txt").write_text("ünïcödé ✓\n", encoding="utf-8")
    (root / "café" / "日本" / "ファイル.txt").write_bytes(b"\x00\x01binary\xff")
    tool = root / "a" / "run.sh"
    tool.write_text("#!/bin/sh\necho hi\n")
    tool.chmod(0o755)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """relative path -> (bytes, mode) of every file; directories as (b'', mode)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = (p.read_bytes() if p.is_file() else b"", p.stat().st_mode & 0o777)
    return out


def sessions(env: Env) -> int:
    return sum(1 for ln in env.daemon.lines if " for @client_e2e: relay " in ln)


def test_rsync_tree_byte_for_byte_and_reuse_the_tunnel(env: Env, tmp_path: Path) -> None:
    cp_dir = Path(env.base) / "cp-rsync"  # short: a unix socket path
    cp_dir.mkdir(mode=0o700, exist_ok=True)
    cfg = ssh_config(env, tmp_path / "ssh_config", tmp_path / "known_hosts", cp_dir)
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src)
    rsh = f"ssh -F {cfg}"

    before = sessions(env)
    out = subprocess.run(["rsync", "-a", "-e", rsh, f"{src}/", f"{HOST}:{dest}/"],
                         capture_output=True, text=True, timeout=90, env=env.env())
    try:
        assert out.returncode == 0, out.stderr
        assert snapshot(dest) == snapshot(src)
        assert len(snapshot(src)) == 12  # 5 directories, 7 files

        (src / "a" / "one.txt").write_text("changed\n")
        out = subprocess.run(["rsync", "-a", "--itemize-changes", "-e", rsh, f"{src}/",
                              f"{HOST}:{dest}/"], capture_output=True, text=True, timeout=90,
                             env=env.env())
        assert out.returncode == 0, out.stderr
        changed = [ln.split(" ", 1)[1] for ln in out.stdout.splitlines() if ln.startswith("<f")]
        assert changed == ["a/one.txt"], out.stdout
        assert snapshot(dest) == snapshot(src)
        # both rsync runs (and the pull below) went through ONE tunnel: the ControlMaster's
        assert sessions(env) - before == 1, env.daemon.lines[-20:]

        back = tmp_path / "back"  # and the other way: device -> controller
        out = subprocess.run(["rsync", "-a", "-e", rsh, f"{HOST}:{dest}/", f"{back}/"],
                             capture_output=True, text=True, timeout=90, env=env.env())
        assert out.returncode == 0, out.stderr
        assert snapshot(back) == snapshot(src)
        assert sessions(env) - before == 1
    finally:
        subprocess.run(["ssh", "-F", str(cfg), "-O", "exit", HOST], capture_output=True,
                       timeout=20, env=env.env())
