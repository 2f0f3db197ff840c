"""`noports` CLI: argument errors, one-line failures (exit 2, no traceback), plane init."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from noports import admin
from noports.keys.atkeys import generate_atkeys, save_atkeys
from tests.harness.plane import free_port


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = admin.main(list(argv))
    except SystemExit as exc:  # argparse errors and --help
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(admin.PLANE_DIR_ENV, raising=False)


@pytest.mark.parametrize("argv", [
    [],
    ["plane"],
    ["atsign"],
    ["bogus"],
    ["plane", "init", "--directory-port", "99999"],
    ["plane", "init", "--directory-port", "x"],
    ["plane", "up", "--timeout", "-1"],
    ["atsign", "create"],
    ["atsign", "create", "@a", "--port", "-5"],
    ["atsign", "activate", "@a", "--cram-secret-file", "f"],
    ["atsign", "activate", "@a", "--root", "nohostport", "--cram-secret-file", "f"],
    ["atsign", "activate", "@a", "--root", "h:99999", "--cram-secret-file", "f"],
])
def test_usage_errors_exit_2(capsys, argv):
    rc, _out, err = run(capsys, *argv)
    assert rc == 2
    assert "usage: noports" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["--help"], ["plane", "--help"], ["plane", "init", "--help"], ["plane", "up", "--help"],
    ["plane", "status", "--help"], ["atsign", "create", "--help"],
    ["atsign", "import", "--help"], ["atsign", "activate", "--help"], ["atsign", "list", "--help"], ["atsign", "remove", "--help"],
])
def test_help(capsys, argv):
    rc, out, _err = run(capsys, *argv)
    assert rc == 0
    assert out.startswith("usage: noports")


def test_missing_dir(capsys):
    rc, _out, err = run(capsys, "atsign", "list")
    assert rc == 2
    assert err.strip() == "noports: error: no plane directory: pass --dir D (or set " \
                          "$NOPORTS_PLANE_DIR)"


@pytest.mark.parametrize("argv", [
    ["plane", "up"], ["plane", "status"], ["atsign", "list"], ["atsign", "remove", "@a"],
    ["atsign", "create", "@a"],
])
def test_plane_not_initialised(capsys, tmp_path: Path, argv):
    rc, _out, err = run(capsys, *argv, "--dir", str(tmp_path / "none"))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "not an initialised plane" in lines[0] and "noports plane init" in lines[0]


def test_plane_init_prints_trust_instructions(capsys, tmp_path: Path):
    d = tmp_path / "plane"
    rc, out, err = run(capsys, "plane", "init", "--dir", str(d), "--name", "relay.example")
    assert rc == 0, err
    assert f"export SSL_CERT_FILE={d.resolve() / 'tls' / 'ca.pem'}" in out
    assert "relay.example" in out
    assert json.loads((d / "plane.json").read_text())["directory_port"] == 6464
    # idempotent
    rc, _out, err = run(capsys, "plane", "init", "--dir", str(d), "--name", "relay.example")
    assert rc == 0, err
    rc, _out, err = run(capsys, "plane", "init", "--dir", str(d), "--directory-port", "7000")
    assert rc == 2 and "--force" in err


def test_plane_dir_from_env(capsys, tmp_path: Path, monkeypatch):
    monkeypatch.setenv(admin.PLANE_DIR_ENV, str(tmp_path))
    rc, _out, err = run(capsys, "-q", "plane", "init")
    assert rc == 0, err
    assert (tmp_path / "plane.json").exists()


@pytest.fixture
def plane(capsys, tmp_path: Path) -> Path:
    d = tmp_path / "plane"
    assert run(capsys, "plane", "init", "--dir", str(d))[0] == 0
    return d


def test_bad_atsign(capsys, plane: Path):
    rc, _out, err = run(capsys, "atsign", "create", "@a:b", "--dir", str(plane))
    assert rc == 2 and "not a valid atSign" in err


def test_create_refuses_existing_keys_file(capsys, plane: Path, tmp_path: Path):
    keys_dir = tmp_path / "keys"
    save_atkeys(generate_atkeys("@alice"), keys_dir / "@alice_key.atKeys")
    rc, _out, err = run(capsys, "atsign", "create", "@Alice", "--dir", str(plane),
                        "--keys-dir", str(keys_dir))
    assert rc == 2
    assert "already exists; use --force" in err


@pytest.mark.parametrize("content, match", [
    ("garbage", "not valid JSON"),
    ('{"selfEncryptionKey": "x"}', "missing field"),
])
def test_import_bad_file(capsys, plane: Path, tmp_path: Path, content: str, match: str):
    f = tmp_path / "@bob_key.atKeys"
    f.write_text(content)
    rc, _out, err = run(capsys, "atsign", "import", str(f), "--dir", str(plane))
    assert rc == 2
    assert match in err and str(f) in err
    assert len(err.strip().splitlines()) == 1


def test_import_missing_file(capsys, plane: Path, tmp_path: Path):
    rc, _out, err = run(capsys, "atsign", "import", str(tmp_path / "nope.atKeys"), "--dir",
                        str(plane))
    assert rc == 2 and "no such file" in err


def test_create_when_plane_down(capsys, plane: Path, tmp_path: Path):
    """With the plane not running: one line saying so, and nothing left behind."""
    pytest.importorskip("noports.atserver.admin")
    pytest.importorskip("noports.directory.store")
    from noports.keys.plane import PlaneConfig
    cfg = PlaneConfig.load(plane)
    cfg.directory_port = free_port()
    cfg.save()
    keys_dir = tmp_path / "keys"
    rc, _out, err = run(capsys, "atsign", "create", "@alice", "--dir", str(plane),
                        "--keys-dir", str(keys_dir))
    assert rc == 2
    assert "does not answer" in err and "noports plane up" in err
    assert not (keys_dir / "@alice_key.atKeys").exists()
    from noports.atserver.admin import list_atsigns
    assert list_atsigns(cfg.state_dir) == {}


def test_remove_unknown(capsys, plane: Path):
    pytest.importorskip("noports.atserver.admin")
    pytest.importorskip("noports.directory.store")
    rc, _out, err = run(capsys, "atsign", "remove", "@ghost", "--dir", str(plane))
    assert rc == 2 and "not hosted" in err


def test_list_empty(capsys, plane: Path):
    pytest.importorskip("noports.atserver.admin")
    pytest.importorskip("noports.directory.store")
    rc, out, _err = run(capsys, "atsign", "list", "--dir", str(plane), "--json")
    assert rc == 0 and json.loads(out) == {}


def test_status_when_down(capsys, plane: Path):
    pytest.importorskip("noports.atserver.admin")
    pytest.importorskip("noports.directory.store")
    from noports.keys.plane import PlaneConfig
    cfg = PlaneConfig.load(plane)
    cfg.directory_port = free_port()
    cfg.save()
    rc, out, _err = run(capsys, "plane", "status", "--dir", str(plane))
    assert rc == 1
    assert "plane up: no" in out and "not answering" in out


def test_console_script_no_traceback(tmp_path: Path):
    """The installed entry point: one line on stderr, exit 2."""
    res = subprocess.run([sys.executable, "-m", "noports.admin", "plane", "status", "--dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_activate_missing_secret_file(capsys, tmp_path: Path):
    rc, _out, err = run(capsys, "atsign", "activate", "@a", "--root", "127.0.0.1:1",
                        "--cram-secret-file", str(tmp_path / "nope"), "--keys-dir",
                        str(tmp_path))
    assert rc == 2 and "cannot read the CRAM secret" in err
    assert len(err.strip().splitlines()) == 1


def test_activate_empty_secret_file(capsys, tmp_path: Path):
    f = tmp_path / "secret"
    f.write_text("\n")
    rc, _out, err = run(capsys, "atsign", "activate", "@a", "--root", "127.0.0.1:1",
                        "--cram-secret-file", str(f), "--keys-dir", str(tmp_path))
    assert rc == 2 and "does not hold a CRAM secret" in err


def test_activate_server_down(capsys, tmp_path: Path):
    f = tmp_path / "secret"
    f.write_text("ab" * 64)
    rc, _out, err = run(capsys, "atsign", "activate", "@a", "--root",
                        f"127.0.0.1:{free_port()}", "--cram-secret-file", str(f),
                        "--keys-dir", str(tmp_path / "k"))
    assert rc == 2
    assert "connection refused" in err and "ab" * 64 not in err
    assert not (tmp_path / "k" / "@a_key.atKeys").exists()


def test_create_secret_out_refuses_existing(capsys, plane: Path, tmp_path: Path):
    f = tmp_path / "secret"
    f.write_text("x")
    rc, _out, err = run(capsys, "atsign", "create", "@a", "--dir", str(plane),
                        "--cram-secret-out", str(f))
    assert rc == 2 and "already exists" in err
