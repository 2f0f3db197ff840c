"""sshnp flag and profile parsing, the OpenSSH command line, messages and exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from noports.client import cli
from noports.client.errors import EXIT_USAGE, RelayError, UsageError
from noports.client.params import SessionParams, parse_root
from noports.client.progress import Progress
from noports.client.sshcmd import printable, ssh_command

BASE = ["-f", "@Alice", "-t", "dev_atsign", "-r", "@r1"]


def test_minimal_flags_and_defaults() -> None:
    o = cli.parse_args(BASE)
    p = o.params
    assert o.output == "exec" and o.local_port == 0 and o.command == []
    assert p.client_atsign == "@alice" and p.device_atsign == "@dev_atsign"
    assert p.relays == ["@r1"] and p.device == "default"
    assert p.tunnel_mode == "aes" and p.root == ("root.atsign.org", 64)
    assert (p.relay_timeout, p.daemon_timeout) == (20.0, 15.0)
    assert p.keys_path.name == "@alice_key.atKeys"
    assert p.need_remote_user


def test_relay_lists_commas_and_repeats() -> None:
    o = cli.parse_args(["-f", "@a", "-t", "@d", "-r", "@r1, @r2", "-r", "r3"])
    assert o.params.relays == ["@r1", "@r2", "@r3"]


def test_remote_command_and_options() -> None:
    o = cli.parse_args([*BASE, "-u", "pi", "-o", "Compression=yes", "-o", "ForwardAgent=no",
                        "-d", "box-1", "uname", "-a"])
    assert o.command == ["uname", "-a"]
    assert o.ssh_options == ["Compression=yes", "ForwardAgent=no"]
    assert o.params.remote_user == "pi" and o.params.device == "box-1"


def test_stdio_mode_and_known_hosts(tmp_path: Path) -> None:
    o = cli.parse_args([*BASE, "--stdio", "--known-hosts", str(tmp_path / "kh")])
    assert o.output == "stdio"
    assert o.params.known_hosts_file == tmp_path / "kh"
    assert not o.params.need_remote_user  # aes stdio: the caller's ssh has its own user
    o = cli.parse_args([*BASE, "--stdio", "--tunnel-mode", "ssh"])
    assert o.params.need_remote_user  # the outer SSH authenticates as the device user


@pytest.mark.parametrize("argv, msg", [
    (["-t", "@d", "-r", "@r"], "-f/--from"),
    (["-f", "@a", "-r", "@r"], "-t/--to"),
    (["-f", "@a", "-t", "@d"], "-r/--srvd"),
    ([*BASE, "--stdio", "-x"], "cannot be combined"),
    ([*BASE, "--stdio", "ls"], "remote command makes no sense"),
    ([*BASE, "-d", "Bad Name"], "--device"),
    ([*BASE, "--tunnel-mode", "rot13"], "invalid choice"),
    ([*BASE, "-l", "70000"], "--local-port"),
    ([*BASE, "--relay-timeout", "0"], "must be positive"),
    ([*BASE, "--root-domain", "h:99999"], "--root-domain"),
    (["-f", "a:b", "-t", "@d", "-r", "@r"], "not a valid atSign"),
])
def test_usage_errors(argv: list[str], msg: str) -> None:
    with pytest.raises(UsageError, match=msg):
        cli.parse_args(argv)


def test_main_reports_usage_error_without_traceback(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["-f", "@a"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("sshnp: error: arguments: ") and "Traceback" not in err


def test_main_reports_missing_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli.main([*BASE, "-k", str(tmp_path / "none.atKeys"), "-q", "--stdio"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "keys:" in err and "no such file" in err and "activate @alice" in err


def test_profile_file_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "sshnp").mkdir()
    (tmp_path / "sshnp" / "lab.env").write_text(
        "# my lab\nFROM=@alice\nto = @dev\nsrvd=@r1,@r2\nremote-user-name=pi\n"
        "ssh_option=Compression=yes\nssh-option=ServerAliveInterval=5\n"
        "send_ssh_public_key=true\nroot-domain=plane.local:6464\ntunnel_mode=ssh\n"
        "daemon-timeout=3\nexport device='box'\n")
    o = cli.parse_args(["--profile", "lab", "-u", "root", "-r", "@r9"])
    p = o.params
    assert p.client_atsign == "@alice" and p.device == "box"
    assert p.relays == ["@r9"]  # flags override the profile
    assert p.remote_user == "root" and p.send_ssh_public_key
    assert o.ssh_options == ["Compression=yes", "ServerAliveInterval=5"]
    assert p.root == ("plane.local", 6464) and p.tunnel_mode == "ssh"
    assert p.daemon_timeout == 3.0


def test_config_file_flag(tmp_path: Path) -> None:
    f = tmp_path / "x.env"
    f.write_text("from=@a\nto=@d\nsrvd=@r\n")
    assert cli.parse_args(["--config", str(f)]).params.relays == ["@r"]


@pytest.mark.parametrize("text, msg", [
    ("nonsense\n", "expected key=value"),
    ("colour=blue\n", "unknown option 'colour'"),
    ("relay_timeout=soon\n", "expects float"),
    ("send_ssh_public_key=maybe\n", "expects bool"),
])
def test_bad_profiles(tmp_path: Path, text: str, msg: str) -> None:
    f = tmp_path / "bad.env"
    f.write_text(text)
    with pytest.raises(UsageError, match=msg):
        cli.parse_args(["--config", str(f), *BASE])


def test_unknown_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    with pytest.raises(UsageError, match="no profile 'nope'"):
        cli.parse_args(["--profile", "nope", *BASE])
    with pytest.raises(UsageError, match="bad profile name"):
        cli.parse_args(["--profile", "../etc", *BASE])


def test_parse_root() -> None:
    assert parse_root("root.atsign.org") == ("root.atsign.org", 64)
    assert parse_root("127.0.0.1:6464") == ("127.0.0.1", 6464)
    assert parse_root("[::1]:99") == ("::1", 99)


def test_ssh_command_pinned_and_unpinned() -> None:
    argv = ssh_command(ssh_binary="ssh", port=4242, user="pi", alias="dev/box",
                       known_hosts=Path("/k/h"), identity_file=Path("/id"),
                       ssh_options=["Compression=yes"], command=["uname", "-a"])
    assert argv == ["ssh", "-p", "4242", "-o", "HostKeyAlias=dev/box", "-o",
                    "UserKnownHostsFile=/k/h", "-o", "StrictHostKeyChecking=yes", "-o",
                    "CheckHostIP=no", "-i", "/id", "-o", "IdentitiesOnly=yes", "-o",
                    "Compression=yes", "pi@127.0.0.1", "--", "uname", "-a"]
    loose = ssh_command(ssh_binary="ssh", port=1, user=None, alias="a/b", known_hosts=None)
    assert "StrictHostKeyChecking=accept-new" in loose and loose[-1] == "127.0.0.1"
    assert printable(["ssh", "a b"]) == "ssh 'a b'"


def test_error_text_and_progress(capsys: pytest.CaptureFixture) -> None:
    e = RelayError("relay @r did not answer within 20s", hint="is srvd running as @r?")
    assert str(e) == "relay: relay @r did not answer within 20s (is srvd running as @r?)"
    assert e.exit_code == 5
    p = Progress()
    p("asking relay @r for ports")
    p.quiet = True
    p("hidden")
    p.error("boom")
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("sshnp [") and err[0].endswith("asking relay @r for ports")
    assert err[1] == "sshnp: error: boom" and len(err) == 2
    assert p.lines[-1].endswith("hidden")


def test_params_validation() -> None:
    with pytest.raises(UsageError, match="at least one relay"):
        SessionParams(client_atsign="@a", device_atsign="@d", relays=[])


def test_parses_share_nothing_though_the_parser_is_reused():
    """The agent parses every request with one parser: nothing leaks between requests."""
    a = cli.parse_args(["-f", "@a", "-t", "@d", "-r", "@r1", "-r", "@r2", "--stdio"])
    b = cli.parse_args(["-f", "@b", "-t", "@e", "-r", "@r3"])
    assert a.params.relays == ["@r1", "@r2"] and a.output == "stdio"
    assert b.params.relays == ["@r3"] and b.params.client_atsign == "@b"
    assert b.output == "exec"
