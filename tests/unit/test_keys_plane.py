"""Plane layout and config: init is idempotent, paths are relative, certs cover every name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from noports.keys.plane import PlaneConfig, PlaneError, init_plane


def _sans(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)}


def test_init_layout(tmp_path: Path):
    cfg = init_plane(tmp_path / "p", host="127.0.0.1", directory_port=7000,
                     extra_names=["plane.example"])
    d = tmp_path / "p"
    assert (d / "plane.json").exists()
    assert (d / "tls" / "ca.pem").exists() and (d / "tls" / "server.pem").exists()
    assert (d / "atserver").is_dir()
    assert cfg.store_spec == f"sqlite://{d.resolve() / 'directory.db'}"  # sqlite:///abs
    assert cfg.root == ("127.0.0.1", 7000)
    assert _sans(cfg.tls.cert) >= {"127.0.0.1", "localhost", "plane.example"}
    data = json.loads((d / "plane.json").read_text())
    assert data["tls_dir"] == "tls" and data["atserver_state_dir"] == "atserver"
    assert data["version"] == 1 and "directory" not in data


def test_load_round_trip(tmp_path: Path):
    cfg = init_plane(tmp_path, host="plane.example", directory_port=6464,
                     store_spec="redis://localhost:6379/0")
    again = PlaneConfig.load(tmp_path)
    assert again == cfg
    assert again.directory_bind == "0.0.0.0"  # a DNS name cannot be bound: all interfaces
    assert again.store_spec == "redis://localhost:6379/0"


def test_init_idempotent_keeps_ca(tmp_path: Path):
    init_plane(tmp_path)
    ca = (tmp_path / "tls" / "ca.pem").read_bytes()
    init_plane(tmp_path)
    assert (tmp_path / "tls" / "ca.pem").read_bytes() == ca


def test_changing_settings_needs_force(tmp_path: Path):
    init_plane(tmp_path)
    ca = (tmp_path / "tls" / "ca.pem").read_bytes()
    with pytest.raises(PlaneError, match="already initialised with different settings"):
        init_plane(tmp_path, directory_port=7001)
    cfg = init_plane(tmp_path, directory_port=7001, extra_names=["10.0.0.5"], force=True)
    assert cfg.directory_port == 7001
    assert (tmp_path / "tls" / "ca.pem").read_bytes() == ca
    assert "10.0.0.5" in _sans(cfg.tls.cert)


def test_relocatable(tmp_path: Path):
    init_plane(tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    cfg = PlaneConfig.load(tmp_path / "b")
    assert cfg.tls.exists()
    assert cfg.state_dir == (tmp_path / "b" / "atserver").resolve()


def test_not_initialised(tmp_path: Path):
    with pytest.raises(PlaneError, match="not an initialised plane.*noports plane init"):
        PlaneConfig.load(tmp_path)


@pytest.mark.parametrize("content, match", [
    ("{", "unreadable"),
    ("[]", "JSON object"),
    ('{"version": 9}', "unsupported"),
    ('{"bogus": 1}', "unknown setting"),
])
def test_bad_config(tmp_path: Path, content: str, match: str):
    (tmp_path / "plane.json").write_text(content)
    with pytest.raises(PlaneError, match=match):
        PlaneConfig.load(tmp_path)


def test_bad_port(tmp_path: Path):
    with pytest.raises(PlaneError, match="out of range"):
        init_plane(tmp_path, directory_port=70000)
