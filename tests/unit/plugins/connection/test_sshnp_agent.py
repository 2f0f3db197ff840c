"""The connection plugin's ``sshnp_agent`` option (on by default): the ProxyCommand is the
agent's connector with the same client flags, OpenSSH is told to take a passed fd, and the
agent lives in the (per-job) ssh control path dir; ``false``, or no connector installed,
gives today's ``sshnp --stdio`` per host (the latter with a warning)."""

from __future__ import annotations

from .test_sshnp import _isolated, build, client_argv, make_conn, opts_of

AUTOUSE_FIXTURES = (_isolated,)  # imported for its autouse effect in this module too


def _exe(tmp_path, name: str) -> str:
    exe = tmp_path / "venv" / "bin" / name
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return str(exe)


def test_agent_is_the_default_with_the_same_flags_as_sshnp_stdio(tmp_path):
    sshnp = _exe(tmp_path, "sshnp")
    connect = _exe(tmp_path, "sshnp-connect")
    plain = client_argv(opts_of(build(make_conn(ansible_sshnp_executable=sshnp,
                                                ansible_sshnp_agent=False)))["proxycommand"])
    opts = opts_of(build(make_conn(ansible_sshnp_executable=sshnp)))
    argv = client_argv(opts["proxycommand"])
    assert argv[:3] == [connect, "--agent-dir", str(tmp_path / "cp" / "sshnp-agent")]
    assert argv[3:] == plain[2:]  # every client flag as in sshnp --stdio
    assert opts["proxyusefdpass"] == "yes"


def test_agent_false_keeps_sshnp_stdio(tmp_path):
    sshnp = _exe(tmp_path, "sshnp")
    _exe(tmp_path, "sshnp-connect")
    for off in (False, "false", "no"):
        opts = opts_of(build(make_conn(ansible_sshnp_executable=sshnp, ansible_sshnp_agent=off)))
        assert client_argv(opts["proxycommand"])[:2] == [sshnp, "--stdio"]
        assert "proxyusefdpass" not in opts


def test_agent_dir_follows_the_control_path_dir(tmp_path):
    sshnp = _exe(tmp_path, "sshnp")
    _exe(tmp_path, "sshnp-connect")
    job = tmp_path / "job" / "cp"  # AWX: the job's private ANSIBLE_SSH_CONTROL_PATH_DIR
    conn = make_conn(ansible_sshnp_executable=sshnp, ansible_control_path_dir=str(job))
    argv = client_argv(opts_of(build(conn))["proxycommand"])
    assert argv[1:3] == ["--agent-dir", str(job / "sshnp-agent")]


def test_control_commands_need_no_fdpass(tmp_path):
    conn = make_conn(ansible_sshnp_executable=_exe(tmp_path, "sshnp"))
    _exe(tmp_path, "sshnp-connect")
    opts = opts_of(build(conn, "-O", "exit"))
    assert "proxycommand" not in opts and "proxyusefdpass" not in opts


def test_missing_connector_falls_back_to_sshnp_stdio_with_a_warning(tmp_path, monkeypatch):
    from ansible_collections.noports.sshnp.plugins.connection import sshnp as plugin
    shown: list[str] = []
    monkeypatch.setattr(plugin.display, "warning", lambda msg, *a, **k: shown.append(msg))
    sshnp = _exe(tmp_path, "sshnp")  # an older noports: no sshnp-connect beside it or on PATH
    opts = opts_of(build(make_conn(ansible_sshnp_executable=sshnp)))
    assert client_argv(opts["proxycommand"])[:2] == [sshnp, "--stdio"]
    assert "proxyusefdpass" not in opts
    assert shown and "no sshnp-connect next to" in shown[0]
    assert "running one sshnp --stdio per host" in shown[0]
