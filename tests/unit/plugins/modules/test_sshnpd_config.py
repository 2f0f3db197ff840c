"""sshnpd_config: content the daemon accepts, idempotence, check and diff mode."""

from __future__ import annotations

import os
import stat

import pytest
from ansible_collections.noports.sshnp.plugins.module_utils import noports_sshnpd as cfg
from ansible_collections.noports.sshnp.plugins.modules import sshnpd_config

BASE = {"atsign": "@Garage_Pi", "managers": ["alice", "@Bob"], "device": "My Garage",
        "root_domain": "127.0.0.1:6464", "permit_open": ["localhost:22"],
        "local_sshd_port": 2222, "ca_file": "/etc/noports/ca.pem",
        "authorized_keys": "/home/pi/.ssh/authorized_keys",
        "ephemeral_permissions": 'command="echo hi"', "hide": False, "verbose": True}


def args(tmp_path, **extra):
    return {"path": str(tmp_path / "sshnpd.conf"), **BASE, **extra}


def test_first_run_writes_second_is_noop(tmp_path, run_module):
    r1 = run_module(sshnpd_config, args(tmp_path))
    assert r1["changed"] is True
    text = (tmp_path / "sshnpd.conf").read_text()
    assert "atsign = @garage_pi\n" in text
    assert "managers = @alice,@bob\n" in text
    assert "device = my_garage\n" in text
    assert stat.S_IMODE(os.stat(tmp_path / "sshnpd.conf").st_mode) == 0o644
    r2 = run_module(sshnpd_config, args(tmp_path))
    assert r2["changed"] is False
    assert r2["content"] == text


def test_daemon_parser_reads_what_we_write(tmp_path, run_module):
    """The real sshnpd parser (src/noports/daemon/config.py) accepts the rendered file."""
    daemon_config = pytest.importorskip("noports.daemon.config")
    run_module(sshnpd_config, args(tmp_path))
    raw = daemon_config.load_config_file(tmp_path / "sshnpd.conf")
    built = daemon_config.build_config(raw)
    assert built.atsign == "@garage_pi"
    assert built.managers == ("@alice", "@bob")
    assert built.device == "my_garage"
    assert built.local_sshd_port == 2222
    assert built.root == ("127.0.0.1", 6464)
    assert built.ephemeral_permissions == 'command="echo hi"'
    assert built.verbose is True and built.hide is False


def test_check_mode_reports_change_without_writing(tmp_path, run_module):
    r = run_module(sshnpd_config, args(tmp_path), check=True, diff=True)
    assert r["changed"] is True
    assert not (tmp_path / "sshnpd.conf").exists()
    assert r["diff"]["before"] == ""
    assert "atsign = @garage_pi" in r["diff"]["after"]
    assert r["diff"]["before_header"].endswith("(absent)")


def test_diff_shows_changed_setting(tmp_path, run_module):
    run_module(sshnpd_config, args(tmp_path))
    r = run_module(sshnpd_config, args(tmp_path, local_sshd_port=22), diff=True)
    assert r["changed"] is True
    assert "local_sshd_port = 2222" in r["diff"]["before"]
    assert "local_sshd_port = 22\n" in r["diff"]["after"]
    assert "local_sshd_port = 22\n" in (tmp_path / "sshnpd.conf").read_text()


def test_mode_only_change_is_fixed(tmp_path, run_module):
    run_module(sshnpd_config, args(tmp_path))
    os.chmod(tmp_path / "sshnpd.conf", 0o600)
    r = run_module(sshnpd_config, args(tmp_path))
    assert r["changed"] is True
    assert stat.S_IMODE(os.stat(tmp_path / "sshnpd.conf").st_mode) == 0o644


def test_absent(tmp_path, run_module):
    run_module(sshnpd_config, args(tmp_path))
    r = run_module(sshnpd_config, {"path": str(tmp_path / "sshnpd.conf"), "state": "absent"},
                   check=True)
    assert r["changed"] is True and (tmp_path / "sshnpd.conf").exists()
    r = run_module(sshnpd_config, {"path": str(tmp_path / "sshnpd.conf"), "state": "absent"})
    assert r["changed"] is True and not (tmp_path / "sshnpd.conf").exists()
    r = run_module(sshnpd_config, {"path": str(tmp_path / "sshnpd.conf"), "state": "absent"})
    assert r["changed"] is False


@pytest.mark.parametrize("bad, needle", [
    ({"atsign": "not valid"}, "atsign"),
    ({"managers": ["a b"]}, "managers"),
    ({"device": "-x"}, "device"),
    ({"permit_open": ["localhost"]}, "permit_open"),
    ({"local_sshd_port": 70000}, "local_sshd_port"),
    ({"ephemeral_permissions": "a\nb"}, "newlines"),
])
def test_bad_values_fail_before_writing(tmp_path, run_module, bad, needle):
    r = run_module(sshnpd_config, args(tmp_path, **bad))
    assert r["failed"] and needle in r["msg"]
    assert not (tmp_path / "sshnpd.conf").exists()


def test_present_needs_atsign_and_managers(tmp_path, run_module):
    r = run_module(sshnpd_config, {"path": str(tmp_path / "c"), "atsign": "@x"})
    assert r["failed"] and "managers" in r["msg"]


@pytest.mark.parametrize("value", ['"quoted"', " lead", "trail ", "'", 'a"', ""])
def test_quoting_round_trips(value):
    text = cfg.render({"atsign": "@a", "managers": ["@b"], "ephemeral_permissions": value})
    assert cfg.parse(text)["ephemeral_permissions"] == value


def test_backup(tmp_path, run_module):
    run_module(sshnpd_config, args(tmp_path))
    r = run_module(sshnpd_config, args(tmp_path, device="other", backup=True))
    assert r["changed"] and os.path.exists(r["backup_file"])
