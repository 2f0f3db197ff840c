"""The connection plugin's ``sshnp_agent`` option: the ProxyCommand becomes the agent's
connector with the same client flags, OpenSSH is told to take a passed fd, and the agent
lives in the (per-job) ssh control path dir."""

from __future__ import annotations

import pytest
from ansible.errors import AnsibleError

from .test_sshnp import _isolated, build, client_argv, make_conn, opts_of

AUTOUSE_FIXTURES = (_isolated,)  # imported for its autouse effect in this module too


def _exe(tmp_path, name: str) -> str:
    exe = tmp_path / "venv" / "bin" / name
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return str(exe)


def test_agent_off_by_default_keeps_sshnp_stdio(tmp_path):
    opts = opts_of(build(make_conn()))
    assert client_argv(opts["proxycommand"])[:2] == ["/opt/np/bin/sshnp", "--stdio"]
    assert "proxyusefdpass" not in opts


def test_agent_on_uses_the_connector_with_the_same_flags(tmp_path):
    sshnp = _exe(tmp_path, "sshnp")
    connect = _exe(tmp_path, "sshnp-connect")
    plain = client_argv(opts_of(build(make_conn(ansible_sshnp_executable=sshnp)))
                        ["proxycommand"])
    opts = opts_of(build(make_conn(ansible_sshnp_executable=sshnp, ansible_sshnp_agent=True)))
    argv = client_argv(opts["proxycommand"])
    assert argv[:3] == [connect, "--agent-dir", str(tmp_path / "cp" / "sshnp-agent")]
    assert argv[3:] == plain[2:]  # every client flag as in sshnp --stdio
    assert opts["proxyusefdpass"] == "yes"


def test_control_commands_need_no_fdpass(tmp_path):
    conn = make_conn(ansible_sshnp_executable=_exe(tmp_path, "sshnp"), ansible_sshnp_agent=True)
    _exe(tmp_path, "sshnp-connect")
    opts = opts_of(build(conn, "-O", "exit"))
    assert "proxycommand" not in opts and "proxyusefdpass" not in opts


def test_missing_connector_is_named(tmp_path, monkeypatch):
    from ansible_collections.noports.sshnp.plugins.connection import sshnp as plugin
    monkeypatch.setattr(plugin.shutil, "which", lambda name: None)
    conn = make_conn(ansible_sshnp_executable=_exe(tmp_path, "sshnp"), ansible_sshnp_agent=True)
    with pytest.raises(AnsibleError, match="no sshnp-connect next to"):
        build(conn)
