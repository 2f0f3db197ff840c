"""Storage, outbound reply parsing, admin API and CLI of the atServer (no sockets)."""

from __future__ import annotations

import os
import stat

import pytest

from noports.atserver import admin, cli
from noports.atserver.store import NotificationRow, Store
from noports.atserver.wire import parse_proof, parse_reply, reply_complete


def test_commit_ids_are_monotonic_per_atsign(tmp_path):
    s = Store(tmp_path / "db.sqlite")
    assert s.last_commit_id("@a") == -1
    assert s.put("@a", "k1@a", "v", {}, commit=True) == 0
    assert s.put("@a", "k2@a", "v", {}, commit=True) == 1
    assert s.put("@b", "k1@b", "v", {}, commit=True) == 0
    assert s.put("@a", "privatekey:x", "v", {}, commit=False) == -1
    assert s.delete("@a", "k1@a", commit=True) == 2
    assert s.last_commit_id("@a") == 2
    assert [op for _c, _k, op in s.commit_entries("@a")] == ["+", "+", "-"]
    s.close()


def test_state_survives_reopen_and_file_is_private(tmp_path):
    p = tmp_path / "atserver.db"
    s = Store(p)
    s.put("@a", "k@a", "v", {"ttl": 5}, commit=True, expires_at=10)
    s.close()
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    s = Store(p)
    rec = s.get("@a", "k@a")
    assert rec is not None and rec.value == "v" and rec.meta == {"ttl": 5}
    assert s.purge_expired_keys(now=11) == 1 and s.get("@a", "k@a") is None
    s.close()


def _row(nid: str, kind: str = "sent", epoch: int = 1, expires: int | None = None,
         status: str = "queued") -> NotificationRow:
    return NotificationRow("@a", nid, kind, "@a", "@b", "@b:k@a", status, 0, 0, epoch, expires,
                           {"id": nid})


def test_notification_queue_and_replay(tmp_path):
    s = Store(tmp_path / "db")
    s.put_notification(_row("n1", epoch=5))
    s.put_notification(_row("n2", epoch=6))
    s.put_notification(_row("r1", kind="received", epoch=7, status="delivered"))
    s.put_notification(_row("r2", kind="received", epoch=8, expires=9, status="delivered"))
    assert [r.id for r in s.pending_sent()] == ["n1", "n2"]
    s.set_notification_status("@a", "n1", "delivered")
    assert [r.id for r in s.pending_sent()] == ["n2"]
    assert [r.id for r in s.notifications("@a", ["received"], after_epoch=7)] == ["r2"]
    assert [r.id for r in s.notifications("@a", ["received"], after_epoch=6, now=10)] == ["r1"]
    assert s.purge_expired_notifications(10) == 1
    assert s.max_epoch("@a") == 7
    s.close()


def test_wire_reply_parsing():
    assert not reply_complete("data:x")
    assert not reply_complete("data:x\n")
    assert reply_complete("data:x\n@")
    assert reply_complete("data:x\n@alice@")
    assert reply_complete("@alice@")
    r = parse_reply("data:hello\n@alice@")
    assert r.ok and r.data == "hello"
    r = parse_reply("error:AT0015-key not found : x does not exist\n@")
    assert r.code == "AT0015" and "does not exist" in r.message
    r = parse_reply('error:{"errorCode":"AT0401","errorDescription":"nope"}\n@')
    assert r.code == "AT0401" and r.message == "nope"
    assert parse_reply("@bob@").data == "@bob@"
    assert parse_reply("bob@data:x\n@bob@").data == "x"  # stray prompt from a split record
    assert parse_proof("proof:_abc@alice:1234") == ("_abc@alice", "1234")
    with pytest.raises(ValueError):
        parse_proof("nonsense")


def test_admin_api(tmp_path):
    d = tmp_path / "state"
    admin.add_atsign(d, "Alice", "secret1")
    admin.add_atsign(d, "@bob", "secret2", port=6000)
    assert admin.list_atsigns(d) == {"@alice": 0, "@bob": 6000}
    s = Store.open_state_dir(d)
    assert s.get("@alice", "privatekey:at_secret").value == "secret1"
    s.close()
    with pytest.raises(admin.AdminError):
        admin.add_atsign(d, "bad atsign", "x")
    with pytest.raises(admin.AdminError):
        admin.add_atsign(d, "@carol", "has space")
    with pytest.raises(TimeoutError):
        admin.wait_for_port(d, "@alice", timeout=0.2)
    assert admin.remove_atsign(d, "@bob")
    assert not admin.remove_atsign(d, "@bob")
    assert admin.list_atsigns(d) == {"@alice": 0}


def test_cli_add_generate_list_remove(tmp_path, capsys):
    d = tmp_path / "state"
    out = tmp_path / "secret.txt"
    assert cli.main(["add", "--state-dir", str(d), "@dan", "--generate",
                     "--secret-out", str(out)]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    assert len(out.read_text().strip()) == 128
    assert cli.main(["list", "--state-dir", str(d)]) == 0
    assert "@dan 0" in capsys.readouterr().out
    assert cli.main(["remove", "--state-dir", str(d), "@dan"]) == 0


def test_cli_bad_input_exit_2_without_traceback(tmp_path, capsys):
    d = tmp_path / "state"
    assert cli.main(["add", "--state-dir", str(d), "bad sign", "--generate",
                     "--print-secret"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert cli.main(["add", "--state-dir", str(d), "@x", "--generate"]) == 2
    assert cli.main(["add", "--state-dir", str(d), "@x", "--cram-secret-file",
                     str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--state-dir", str(d), "--tls-dir", str(d), "--root", "nonsense"])
    assert exc.value.code == 2
