"""Every systemd unit template of the roles, rendered with sample vars, passes
``systemd-analyze verify`` without a warning; run scripts pass ``sh -n``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# controller-side packages: absent in ansible-test's module-only `units` environment
jinja2 = pytest.importorskip("jinja2")
FilterModule = pytest.importorskip("ansible.plugins.filter.core").FilterModule

REPO = Path(__file__).resolve().parents[4]
ROLES = REPO / "roles"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def render(template: Path, variables: dict) -> str:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             trim_blocks=True)
    env.filters.update(FilterModule().filters())
    return env.from_string(template.read_text()).render(
        ansible_managed="Ansible managed: test render", **variables)


@pytest.fixture
def prefix(tmp_path):
    """A runtime prefix with executables, so verify can check ExecStart."""
    bindir = tmp_path / "opt" / "bin"
    bindir.mkdir(parents=True)
    for name in ("sshnpd", "srvd", "noports"):
        (bindir / name).write_text("#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    return tmp_path / "opt"


def cases(prefix: Path):
    yield "sshnpd", "sshnpd", {
        "_sshnpd_atsign": "@garage_pi", "sshnpd_device": "garage", "_sshnpd_user": "root",
        "_sshnpd_group": "root", "sshnpd_runtime_prefix": str(prefix),
        "sshnpd_config_file": "/etc/noports/sshnpd.conf",
        "_sshnpd_authorized_keys": "/home/pi/.ssh/authorized_keys",
        "_sshnpd_keys_dir": "/home/pi/.atsign/keys"}
    official = [str(prefix / "bin" / "sshnpd"), "-a", "@garage_pi", "-m", "@alice,@bob", "-d",
                "garage", "-k", "/root/.atsign/keys/@garage_pi_key.atKeys", "--root-domain",
                "root.atsign.org", "--permit-open", "localhost:22", "--local-sshd-port", "22",
                "--ssh-algorithm", "ssh-ed25519"]
    yield "sshnpd", "sshnpd-official", {
        "_sshnpd_atsign": "@garage_pi", "sshnpd_device": "garage", "_sshnpd_user": "root",
        "_sshnpd_group": "root", "_sshnpd_official_home": "/root",
        "_sshnpd_keys_dir": "/root/.atsign/keys", "_sshnpd_official_argv": official}
    argv = [str(prefix / "bin" / "srvd"), "-a", "@relay", "-k", "/k/@relay_key.atKeys",
            "--root-domain", "plane.example:6464", "--ip", "203.0.113.5", "--manager=@alice"]
    for privileged in (False, True):  # srvd_single_port on 443: CAP_NET_BIND_SERVICE
        yield "srvd", "srvd", {"_srvd_atsign": "@relay", "_srvd_user": "root",
                               "_srvd_group": "root", "_srvd_argv": argv + (
                                   ["--443", "--443-bind-port", "443"] if privileged else []),
                               "_srvd_bind_privileged": privileged,
                               "srvd_single_port_bind_port": 443}
    for port in (6464, 64):
        yield "control_plane", "noports-plane", {
            "_control_plane_user": "root", "_control_plane_group": "root",
            "_control_plane_noports": str(prefix / "bin" / "noports"),
            "control_plane_dir": "/var/lib/noports/plane", "control_plane_host": "127.0.0.1",
            "control_plane_directory_port": port}


def test_every_role_template_is_covered(prefix):
    covered = {(role, name) for role, name, _vars in cases(prefix)}
    found = {(p.parts[-3], p.name.split(".")[0]) for p in ROLES.glob("*/templates/*.service.j2")}
    assert found == covered


@pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                    reason="systemd-analyze not installed (Debian: apt-get install systemd)")
def test_units_verify(prefix, tmp_path):
    for role, name, variables in cases(prefix):
        text = render(ROLES / role / "templates" / f"{name}.service.j2", variables)
        for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                    "RestrictAddressFamilies=", "SystemCallFilter=@system-service",
                    "CapabilityBoundingSet="):
            assert key in text, (role, key)
        unit = tmp_path / f"{name}.service"
        unit.write_text(text)
        proc = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"), check=False)
        problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                    if str(unit) in line or unit.name in line]
        assert proc.returncode == 0 and not problems, (role, proc.stdout + proc.stderr, text)


def test_sshnpd_unit_lets_it_write_authorized_keys(prefix):
    _role, _name, variables = next(iter(cases(prefix)))
    text = render(ROLES / "sshnpd" / "templates" / "sshnpd.service.j2", variables)
    assert "ProtectHome=read-only" in text
    assert "ReadWritePaths=-/home/pi/.ssh\n" in text


def test_low_port_plane_gets_only_bind_capability(prefix):
    plane = [v for r, _n, v in cases(prefix) if r == "control_plane"]
    low = render(ROLES / "control_plane" / "templates" / "noports-plane.service.j2", plane[1])
    high = render(ROLES / "control_plane" / "templates" / "noports-plane.service.j2", plane[0])
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in low
    assert "CapabilityBoundingSet=\n" in high


def test_run_scripts_are_valid_sh(prefix, tmp_path):
    variables = {}
    for _role, _name, v in cases(prefix):
        variables.update(v)
    variables.update(_sshnpd_atsign="@garage_pi", _srvd_atsign="@relay")
    for template in ROLES.glob("*/templates/*.run.j2"):
        text = render(template, variables)
        assert text.startswith("#!/bin/sh\n") and "\nexec " in text
        script = tmp_path / template.name[:-3]
        script.write_text(text)
        subprocess.run(["sh", "-n", str(script)], check=True)
