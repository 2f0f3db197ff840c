"""authorized_keys management: add/remove, leftovers, other lines kept, 0600, concurrency."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
import uuid

import pytest

from noports.daemon.authorized_keys import (
    AuthorizedKeys,
    AuthorizedKeysError,
    ephemeral_line,
    validate_client_public_key,
)
from noports.daemon.sshkeys import generate_ephemeral_key

SID = "0b7e6c1a-3c1f-4f7e-9d5a-2b8f0e6c9a11"
OTHER = ('from="10.0.0.0/8",command="echo \\"a b\\"" ssh-ed25519 '
         "AAAAC3NzaC1lZDI1NTE5AAAAIGl1eLS3Wd0q8o3o+6eR5fdKZ0b9xJ6o8l1yY0qvZb7P alice@laptop")


def pub() -> str:
    return generate_ephemeral_key().public_line


def test_ephemeral_line_format():
    key = pub()
    line = ephemeral_line(key, SID, 2222)
    assert line == ('command="echo \\"ssh session complete\\";sleep 20",'
                    'PermitOpen="localhost:2222",no-agent-forwarding,no-X11-forwarding,'
                    f'no-pty,no-user-rc {key} sshnp_ephemeral_{SID}')
    assert ephemeral_line(key, SID, 22, ',permitlisten="none"').rsplit(" ", 3)[0].endswith(
        ',no-user-rc,permitlisten="none"')
    with pytest.raises(ValueError):
        ephemeral_line(key, "../../etc", 22)
    with pytest.raises(AuthorizedKeysError):
        ephemeral_line("ssh-ed25519 bogus", SID, 22)
    with pytest.raises(AuthorizedKeysError):
        ephemeral_line(key, SID, 22, "x\nssh-rsa AAAA")


def test_add_creates_0600_file_and_dir(tmp_path):
    ak = AuthorizedKeys(tmp_path / "ssh" / "authorized_keys")
    ak.add_ephemeral(pub(), SID, 22)
    path = tmp_path / "ssh" / "authorized_keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ak.ephemeral_sessions() == [SID]
    assert not [p for p in path.parent.iterdir() if p.name != "authorized_keys"]  # no temp left


def test_add_remove_preserves_other_lines_verbatim(tmp_path):
    path = tmp_path / "authorized_keys"
    original = f"# my keys\r\n{OTHER}\n\n   \nssh-rsa AAAAB3NzaC1yc2E bob"  # no final newline
    path.write_text(original)
    path.chmod(0o600)
    ak = AuthorizedKeys(path)
    key = pub()
    line = ak.add_ephemeral(key, SID, 22)
    text = path.read_bytes().decode()
    assert text == original + "\n" + line + "\n"
    assert ak.remove_session(SID) == 1
    assert path.read_bytes().decode() == original + "\n"
    assert ak.remove_session(SID) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_existing_mode_kept_but_never_group_writable(tmp_path):
    path = tmp_path / "authorized_keys"
    path.write_text(OTHER + "\n")
    path.chmod(0o664)
    AuthorizedKeys(path).add_ephemeral(pub(), SID, 22)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_symlinked_file_is_edited_in_place(tmp_path):
    real = tmp_path / "real_keys"
    real.write_text(OTHER + "\n")
    link = tmp_path / "authorized_keys"
    link.symlink_to(real)
    AuthorizedKeys(link).add_ephemeral(pub(), SID, 22)
    assert link.is_symlink() and SID in real.read_text()


def test_duplicate_key_not_added_twice(tmp_path):
    ak = AuthorizedKeys(tmp_path / "authorized_keys")
    key = pub()
    ak.add_ephemeral(key, SID, 22)
    ak.add_ephemeral(key, SID, 22)
    assert len(ak.lines()) == 1


def test_remove_only_touches_the_session_tag(tmp_path):
    path = tmp_path / "authorized_keys"
    # a line that merely mentions the sid in its options must survive
    keep = f'environment="X={SID}" {OTHER.split(" ", 2)[2]}'
    path.write_text(keep + "\n")
    ak = AuthorizedKeys(path)
    ak.add_ephemeral(pub(), SID, 22)
    ak.remove_session(SID)
    assert path.read_text() == keep + "\n"


def test_leftover_cleanup(tmp_path):
    path = tmp_path / "authorized_keys"
    path.write_text(OTHER + "\n")
    ak = AuthorizedKeys(path)
    sids = [str(uuid.uuid4()) for _ in range(3)]
    for s in sids:
        ak.add_ephemeral(pub(), s, 22)
    # an official daemon's line (no restrictions of ours) is recognised too
    with path.open("a") as fh:
        fh.write(f'command="echo",PermitOpen="localhost:22" {pub()} sshnp_ephemeral_{SID}\n')
    assert sorted(ak.ephemeral_sessions()) == sorted([*sids, SID])
    assert ak.remove_all_ephemeral() == 4
    assert path.read_text() == OTHER + "\n"
    assert ak.remove_all_ephemeral() == 0


def test_owner_scoped_cleanup_and_expiry_sweep(tmp_path):
    path = tmp_path / "authorized_keys"
    path.write_text(OTHER + "\n")
    ak = AuthorizedKeys(path)
    mine, live, dead, official = (str(uuid.uuid4()) for _ in range(4))
    ak.add_ephemeral(pub(), mine, 22, owner="@d/pi", until=2000)
    ak.add_ephemeral(pub(), live, 22, owner="@d/other", until=2000)
    ak.add_ephemeral(pub(), dead, 22, owner="@d/gone", until=900)
    ak.add_ephemeral(pub(), official, 22)
    line = [x for x in ak.lines() if mine in x][0]
    assert line.endswith(f"sshnp_ephemeral_{mine} until=2000 owner=@d/pi")
    # start-up of @d/pi at t=1000: its own, the untagged and the expired lines go
    assert ak.remove_all_ephemeral("@d/pi", now=1000) == 3
    assert ak.ephemeral_sessions() == [live]
    assert ak.remove_expired(now=1999) == 0
    assert ak.remove_expired(now=2000) == 1
    assert path.read_text() == OTHER + "\n"
    with pytest.raises(AuthorizedKeysError):
        ak.add_ephemeral(pub(), mine, 22, owner="x y")


def test_startup_cleanup_keeps_own_lines_whose_holder_is_alive(tmp_path):
    """A session that outlived the previous daemon keeps its key (its session host removes
    it); a dead holder's line, and an expired one, are leftovers (decision 0024)."""
    path = tmp_path / "authorized_keys"
    ak = AuthorizedKeys(path)
    handed, crashed, expired = (str(uuid.uuid4()) for _ in range(3))
    ak.add_ephemeral(pub(), handed, 22, owner="@d/pi", until=2000, holder=101)
    ak.add_ephemeral(pub(), crashed, 22, owner="@d/pi", until=2000, holder=102)
    ak.add_ephemeral(pub(), expired, 22, owner="@d/pi", until=900, holder=101)
    line = [x for x in ak.lines() if handed in x][0]
    assert line.endswith(f"sshnp_ephemeral_{handed} until=2000 owner=@d/pi holder=101")
    assert ak.remove_all_ephemeral("@d/pi", now=1000, alive=lambda pid: pid == 101) == 2
    assert ak.ephemeral_sessions() == [handed]
    # without a liveness check (or as another owner's start-up rule) nothing changes for it
    assert ak.remove_all_ephemeral("@d/other", now=1000) == 0
    assert ak.remove_all_ephemeral("@d/pi", now=1000) == 1


def test_missing_file_operations_are_noops(tmp_path):
    ak = AuthorizedKeys(tmp_path / "nope" / "authorized_keys")
    assert ak.remove_all_ephemeral() == 0
    assert ak.remove_session(SID) == 0
    assert ak.lines() == []


def test_client_key_validation_and_add(tmp_path):
    ak = AuthorizedKeys(tmp_path / "authorized_keys")
    key = pub() + " me@host"
    assert ak.add_client_key(key) is True
    assert ak.add_client_key(key) is False  # already present
    assert ak.add_client_key(pub(), 'from="10.0.0.1"') is True
    lines = ak.lines()
    assert lines[0] == key and lines[1].startswith('from="10.0.0.1" ssh-ed25519 ')
    for bad in ("", "ssh-dss AAAAB3NzaC1kc3M=", 'command="x" ' + key, key + "\nx",
                "ssh-ed25519 AAAAB3NzaC1yc2E="):  # blob of another type
        with pytest.raises(AuthorizedKeysError):
            validate_client_public_key(bad)
    with pytest.raises(AuthorizedKeysError):
        ak.add_client_key(pub(), "x\ny")


def _worker(path: str, n: int, out) -> None:  # noqa: ANN001 - multiprocessing queue
    ak = AuthorizedKeys(path)
    mine = []
    for _ in range(n):
        sid = str(uuid.uuid4())
        ak.add_ephemeral(generate_ephemeral_key().public_line, sid, 22)
        mine.append(sid)
    for sid in mine[::2]:
        ak.remove_session(sid)
    out.put(mine[1::2])


def test_concurrent_threads_and_processes_lose_nothing(tmp_path):
    path = tmp_path / "authorized_keys"
    path.write_text(OTHER + "\n")
    path.chmod(0o600)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(path), 10, q)) for _ in range(3)]
    for p in procs:
        p.start()

    class _Q:
        def __init__(self) -> None:
            self.items: list[list[str]] = []

        def put(self, x: list[str]) -> None:
            self.items.append(x)

    tq = _Q()
    threads = [threading.Thread(target=_worker, args=(str(path), 10, tq)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {s for lst in tq.items for s in lst}
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for _ in procs:
        expected |= set(q.get(timeout=5))
    ak = AuthorizedKeys(path)
    assert set(ak.ephemeral_sessions()) == expected
    assert len(expected) == 7 * 5
    assert ak.lines()[0] == OTHER
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
