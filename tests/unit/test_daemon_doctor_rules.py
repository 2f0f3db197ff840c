"""sshnpd --doctor's pure rules, and the official daemon's sshnpd.yaml layout."""

from __future__ import annotations

import pytest

from noports.daemon.cli import parse_args
from noports.daemon.config import ConfigError, parse_config_text, parse_official_yaml
from noports.daemon.doctor import (
    FAIL,
    OK,
    WARN,
    clock_finding,
    parse_dart_date,
    secret_file_mode,
    strict_modes,
)

OFFICIAL = """\
# /etc/noports/sshnpd.yaml as the official installer writes it
atsign:
  atsign: "@garage_pi"
  keys: /home/pi/.atsign/keys/@garage_pi_key.atKeys
  root: root.example.net:64
access:
  managers:
    - "@alice"
    - "@bob"   # the other admin
  permitopen: [localhost:22, "localhost:3389"]
device:
  name: garage
  group: sheds
  hide: true
ssh:
  add-publickeys: false
  sshd-port: 2222
  ephemeral-permissions:
    - no-X11-forwarding
  algorithm: ssh-rsa
  client: openssh
runtime:
  storage-path: /var/lib/sshnpd
  verbose: true
  debug: false
"""


def test_secret_file_modes():
    assert secret_file_mode("k", 0o100600) is None
    assert secret_file_mode("k", 0o100400) is None
    f = secret_file_mode("k", 0o100644)
    assert f is not None and f.status == FAIL and f.fix == "chmod 600 k"


def test_strict_modes_like_sshd():
    assert strict_modes("ak", 0o100600, 1000, 1000) is None
    assert strict_modes("/home", 0o40755, 0, 1000) is None  # root-owned is fine
    f = strict_modes("ak", 0o100620, 1000, 1000)
    assert f and f.status == FAIL and f.fix == "chmod go-w ak"
    assert strict_modes("d", 0o40702, 1000, 1000)  # world-writable directory
    assert strict_modes("/home/pi", 0o40775, 1000, 1000, private_group=True) is None
    assert strict_modes("/home/pi", 0o40777, 1000, 1000, private_group=True)
    f = strict_modes("ak", 0o100600, 1001, 1000)
    assert f and "owned by uid 1001" in f.detail


def test_clock_finding_against_the_request_window():
    assert clock_finding(0.2, 60).status == OK
    w = clock_finding(-10, 60)
    assert w.status == WARN and "10.0s ahead of" in w.detail
    f = clock_finding(45, 60)
    assert f.status == FAIL and "behind" in f.detail and "ntp" in f.fix.lower()


def test_parse_dart_date():
    assert parse_dart_date("1970-01-01 00:00:01.500Z") == 1.5


def test_official_yaml_subset():
    got = parse_official_yaml(OFFICIAL, "sshnpd.yaml")
    assert got["access/managers"] == ["@alice", "@bob"]
    assert got["access/permitopen"] == ["localhost:22", "localhost:3389"]
    assert got["device/hide"] is True and got["ssh/sshd-port"] == 2222


def test_official_yaml_becomes_our_config(tmp_path):
    path = tmp_path / "sshnpd.yaml"
    path.write_text(OFFICIAL)
    cfg = parse_args(["--config", str(path)])
    assert cfg.atsign == "@garage_pi" and cfg.managers == ("@alice", "@bob")
    assert cfg.device == "garage" and cfg.device_group == "sheds" and cfg.hide
    assert cfg.root == ("root.example.net", 64) and cfg.local_sshd_port == 2222
    assert cfg.permit_open == ("localhost:22", "localhost:3389")
    assert cfg.ephemeral_permissions == "no-X11-forwarding"
    assert cfg.ssh_algorithm == "ssh-rsa" and cfg.verbose
    assert str(cfg.storage_path) == "/var/lib/sshnpd"
    assert str(cfg.key_file).endswith("@garage_pi_key.atKeys")
    # flags still override the file
    assert parse_args(["--config", str(path), "-d", "other"]).device == "other"


@pytest.mark.parametrize(("text", "message"), [
    ("atsign:\n  passphrase: x\n", "password-protected"),
    ("access:\n  policy: '@npa'\n", "policy service is not supported"),
    ("device:\n  colour: red\n", "device.colour: unknown setting"),
    ("atsign: '@x'\n", "expected a section"),
    ("  name: x\n", "outside a section"),
    ("device:\n  name: &a x\n", "YAML feature not supported"),
    ("access:\n  permitopen: [a:1\n", "unterminated"),
    ("- x\n", "list item outside a list"),
])
def test_official_yaml_errors_name_the_line(text, message):
    with pytest.raises(ConfigError, match=message) as ei:
        parse_config_text(text, "/etc/noports/sshnpd.yaml")
    assert "/etc/noports/sshnpd.yaml" in str(ei.value)
