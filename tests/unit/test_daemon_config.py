"""sshnpd flags and config files: merging, validation, one-line errors with exit status 2."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from noports.daemon.cli import JsonFormatter, main, parse_args
from noports.daemon.config import (
    ConfigError,
    build_config,
    parse_config_text,
    parse_permit_open,
    parse_root,
)

BASE = ["-a", "@device", "-m", "@client"]


def test_defaults():
    c = parse_args(BASE)
    assert c.atsign == "@device" and c.managers == ("@client",)
    assert c.device == "default" and c.permit_open == ("localhost:22",)
    assert c.local_sshd_port == 22 and c.root == ("root.atsign.org", 64)
    assert not c.hide and not c.accept_public_keys and c.log_format == "text"
    assert c.ephemeral_key_ttl == 15.0 and c.ssh_algorithm == "ssh-ed25519"
    assert c.sshd_host_keys == "/etc/ssh/ssh_host_*_key.pub"
    assert c.keys_path == Path.home() / ".atsign" / "keys" / "@device_key.atKeys"
    assert c.authorized_keys == Path.home() / ".ssh" / "authorized_keys"


def test_official_flags():
    c = parse_args(["-a", "Device", "-m", "@A,@b", "--manager", "@c", "-m", "@a",
                    "-d", "My Pi", "--po", "localhost:22,*:3389", "--local-sshd-port", "2222",
                    "-s", "-S", 'from="10.0.0.1"', "-h", "-u", "-k", "/k/x.atKeys",
                    "--root-domain", "vip.ve.atsign.zone", "-v", "--storage-path", "/tmp/x",
                    "--ssh-algorithm", "ssh-rsa", "--dg", "lab"])
    assert c.atsign == "@device" and c.managers == ("@a", "@b", "@c")
    assert c.device == "my_pi" and c.permit_open == ("localhost:22", "*:3389")
    assert parse_args(BASE + ["--local-sshd-port", "2222"]).permit_open == ("localhost:2222",)
    assert c.local_sshd_port == 2222 and c.accept_public_keys and c.hide and c.verbose
    assert c.sshpublickey_permissions == 'from="10.0.0.1"'
    assert c.keys_path == Path("/k/x.atKeys") and c.root == ("vip.ve.atsign.zone", 64)
    assert c.ssh_algorithm == "ssh-rsa" and c.device_group == "lab"


@pytest.mark.parametrize("fmt,text", [
    ("kv", """
        # comment
        atsign = @device
        managers = @a, @b
        permit-open = localhost:22
        sshpublickey = yes
        hide = false
        root_domain = "127.0.0.1:6464"
        log-format = json
        ephemeral_key_ttl = 3
        storage_path = /ignored
     """),
    ("json", json.dumps({"atsign": "@device", "managers": ["@a", "@b"],
                         "permit_open": "localhost:22", "sshpublickey": True, "hide": False,
                         "root-domain": "127.0.0.1:6464", "log_format": "json",
                         "ephemeral-key-ttl": 3})),
    ("toml", """
        atsign = "@device"
        managers = ["@a", "@b"]
        permit_open = ["localhost:22"]
        sshpublickey = true
        root_domain = "127.0.0.1:6464"
        log_format = "json"
        ephemeral_key_ttl = 3
     """),
])
def test_config_file_formats(tmp_path, fmt, text):
    path = tmp_path / {"kv": "sshnpd.conf", "json": "c.json", "toml": "c.toml"}[fmt]
    path.write_text("\n".join(line.strip() for line in text.splitlines()))
    c = parse_args(["--config", str(path)])
    assert c.atsign == "@device" and c.managers == ("@a", "@b")
    assert c.accept_public_keys and not c.hide and c.log_format == "json"
    assert c.root == ("127.0.0.1", 6464) and c.ephemeral_key_ttl == 3.0


def test_cli_overrides_config_file(tmp_path):
    path = tmp_path / "sshnpd.conf"
    path.write_text("atsign=@device\nmanagers=@a\ndevice=one\nhide=true\n")
    c = parse_args(["--config", str(path), "-d", "two", "-m", "@b"])
    assert c.device == "two" and c.managers == ("@b",) and c.hide


@pytest.mark.parametrize("text,msg", [
    ("atsign=@d\nmanagers=@a\nbogus=1\n", "unknown setting 'bogus'"),
    ("atsign=@d\nmanagers=@a\nhide=maybe\n", "expected true or false"),
    ("atsign=@d\nno equals sign\n", ":2: expected key = value"),
    ("atsign=@d\nmanagers=@a\nlocal_sshd_port=ssh\n", "expected a number"),
])
def test_config_file_errors_name_the_line(text, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config_text(text, "/etc/sshnpd.conf")


def test_bad_json_and_toml():
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_config_text("{", "x.json")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        parse_config_text("[1]", "x.json")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config_text("a = ", "x.toml")
    with pytest.raises(ConfigError, match="list of strings"):
        parse_config_text('{"managers": [1]}', "x.json")


@pytest.mark.parametrize("settings,msg", [
    ({"managers": ["@a"]}, "--atsign is required"),
    ({"atsign": "@d"}, "--managers is required"),
    ({"atsign": "@d", "managers": ["a b"]}, "not a valid atSign"),
    ({"atsign": "@d", "managers": ["@a"], "device": "x"}, "too short"),
    ({"atsign": "@d", "managers": ["@a"], "device": "a.b"}, "contains"),
    ({"atsign": "@d", "managers": ["@a"], "permit_open": ["localhost"]}, "host:port"),
    ({"atsign": "@d", "managers": ["@a"], "permit_open": ["h:70000"]}, "host:port"),
    ({"atsign": "@d", "managers": ["@a"], "local_sshd_port": 0}, "out of range"),
    ({"atsign": "@d", "managers": ["@a"], "root_domain": "h:x"}, "bad port"),
    ({"atsign": "@d", "managers": ["@a"], "ephemeral_key_ttl": 0}, "ephemeral-key-ttl"),
    ({"atsign": "@d", "managers": ["@a"], "ephemeral_permissions": "a\nb"}, "newlines"),
])
def test_validation_errors(settings, msg):
    with pytest.raises(ConfigError, match=msg):
        build_config(settings)


def test_permit_open_and_root_parsing():
    assert parse_permit_open(["*:*", "localhost:22,localhost:22", "[::1]:22"]) == (
        "*:*", "localhost:22", "[::1]:22")
    assert parse_root("root.atsign.org") == ("root.atsign.org", 64)
    assert parse_root("127.0.0.1:6464") == ("127.0.0.1", 6464)
    assert parse_root("[::1]:64") == ("::1", 64)


@pytest.mark.parametrize("argv,msg", [
    ([], "--atsign is required"),
    (["-a", "@d"], "--managers is required"),
    (BASE + ["--local-sshd-port", "x"], "invalid int value"),
    (BASE + ["--log-format", "xml"], "invalid choice"),
    (BASE + ["--frobnicate"], "unrecognized arguments"),
    (BASE + ["-p", "@policy"], "not supported"),
    (BASE + ["--config", "/nonexistent/sshnpd.conf"], "cannot read config file"),
    (BASE + ["-d", "BAD.NAME"], "-d/--device"),
])
def test_cli_errors_are_one_line_exit_2(capsys, argv, msg):
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sshnpd: error: ") and msg in err
    assert "Traceback" not in err


def test_missing_keys_file_exit_2_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "noports.daemon.cli", *BASE, "-k",
                          str(tmp_path / "none.atKeys")], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and "cannot load keys" in res.stderr


def test_help_mentions_hide_and_exits_0():
    res = subprocess.run([sys.executable, "-m", "noports.daemon.cli", "--help"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0
    assert "--hide" in res.stdout and "--permit-open" in res.stdout


def test_json_log_formatter_has_extras_only_when_set():
    rec = logging.LogRecord("noports.sshnpd", logging.WARNING, __file__, 1, "hello %s",
                            ("x",), None)
    rec.event = "unauthorized"
    rec.sender = "@eve"
    out = json.loads(JsonFormatter().format(rec))
    assert out["msg"] == "hello x" and out["level"] == "warning"
    assert out["event"] == "unauthorized" and out["sender"] == "@eve"
    assert "session" not in out and out["ts"].endswith("Z")


def test_session_host_idle_flag_config_key_and_the_error_naming_them():
    """--session-host-idle (decision 0032): default 300, 0 keeps the host loaded, anything
    else outside 1..86400 is refused with the flag's name and the accepted range."""
    from noports.daemon.handoff import host_argv

    assert parse_args(["-a", "@d", "-m", "@c"]).session_host_idle == 300
    assert parse_args(["-a", "@d", "-m", "@c", "--session-host-idle", "0"]).session_host_idle == 0
    assert build_config({"atsign": "@d", "managers": ["@c"], **parse_config_text(
        "session-host-idle = 45\n")}).session_host_idle == 45
    for bad in ("0.5", "-1", "86401", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"--session-host-idle: expected 0 \(keep it\) "
                                              r"or 1 <= seconds <= 86400"):
            parse_args(["-a", "@d", "-m", "@c", "--session-host-idle", bad])
    assert host_argv("json", False, "@d/x", "/ak", 0)[-2:] == ["--authorized-keys", "/ak"]
    assert host_argv("json", False, "@d/x", "/ak", 45)[-2:] == ["--idle", "45"]
