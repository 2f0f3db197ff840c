"""noports_runtime: offline install from the collection's payload, version-aware idempotence."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
from ansible_collections.noports.sshnp.plugins.modules import noports_runtime

REPO = Path(__file__).resolve().parents[4]


def _payload_builder():
    spec = importlib.util.spec_from_file_location("noports_payload",
                                                  REPO / "scripts" / "noports_payload.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    builder = _payload_builder()
    data, manifest = builder.build(str(REPO))
    path = tmp_path_factory.mktemp("payload") / "noports.tar.gz"
    path.write_bytes(data)
    return path, manifest


def args(tmp_path, payload, **extra):
    # the test env's site-packages stand in for distro python3-cryptography/python3-regex
    return {"src": str(payload[0]), "prefix": str(tmp_path / "opt"), "python": sys.executable,
            "site_dirs": [sysconfig.get_paths()["purelib"]], **extra}


def test_payload_is_deterministic_and_complete():
    builder = _payload_builder()
    a, manifest = builder.build(str(REPO))
    b, _manifest = builder.build(str(REPO))
    assert a == b
    assert manifest["entry_points"]["noports"] == "noports.admin:main"
    assert "srvd" in manifest["entry_points"]
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        names = tar.getnames()
    assert "noports/__init__.py" in names and "noports/admin.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_install_then_noop_then_check_and_diff(tmp_path, payload, run_module):
    r = run_module(noports_runtime, args(tmp_path, payload), check=True, diff=True)
    assert r["changed"] and r["installed"] and not (tmp_path / "opt").exists()
    assert json.loads(r["diff"]["after"])["version"] == payload[1]["version"]

    r = run_module(noports_runtime, args(tmp_path, payload))
    assert r["changed"] and r["version"] == payload[1]["version"]
    noports = Path(r["scripts"]["noports"])
    assert noports.read_text().startswith("#!" + str(tmp_path / "opt" / "venv" / "bin" / "python"))
    out = subprocess.run([str(noports), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "plane" in out.stdout
    # the code comes from the payload, not from the test environment's checkout
    where = subprocess.run([r["python"], "-c", "import noports; print(noports.__file__)"],
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "opt" / "lib" / "current"))

    r = run_module(noports_runtime, args(tmp_path, payload))
    assert not r["changed"]
    r = run_module(noports_runtime, args(tmp_path, payload), check=True)
    assert not r["changed"]


def test_changed_payload_reinstalls_and_prunes(tmp_path, payload, run_module):
    run_module(noports_runtime, args(tmp_path, payload))
    # a "new version": same code, different manifest version
    new = tmp_path / "new.tar.gz"
    with tarfile.open(payload[0]) as src, tarfile.open(new, "w:gz") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name == "noports-payload.json":
                manifest = json.loads(data)
                manifest["version"] = "9.9.9"
                data = json.dumps(manifest).encode()
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    r = run_module(noports_runtime, args(tmp_path, (new, None)), diff=True)
    assert r["changed"] and r["version"] == "9.9.9"
    assert '"version": "0.1.0"' in r["diff"]["before"] or payload[1]["version"] != "0.1.0"
    libs = sorted(p.name for p in (tmp_path / "opt" / "lib").iterdir())
    assert libs == ["current", json.loads((tmp_path / "opt" / "noports-runtime.json").read_text())["code"]]


def test_deleted_tree_is_repaired(tmp_path, payload, run_module):
    r = run_module(noports_runtime, args(tmp_path, payload))
    os.unlink(r["scripts"]["srvd"])
    r = run_module(noports_runtime, args(tmp_path, payload))
    assert r["changed"] and os.path.exists(r["scripts"]["srvd"])


def test_missing_dependency_names_the_debian_package(tmp_path, payload, run_module):
    r = run_module(noports_runtime, args(tmp_path, payload, site_dirs=[],
                                         required_imports=["no_such_mod_xyz", "regex"],
                                         python=sys.executable))
    assert r["failed"] and "no_such_mod_xyz" in r["msg"]


def test_absent(tmp_path, payload, run_module):
    run_module(noports_runtime, args(tmp_path, payload))
    r = run_module(noports_runtime, {"prefix": str(tmp_path / "opt"), "state": "absent"})
    assert r["changed"]
    assert not (tmp_path / "opt" / "venv").exists() and not (tmp_path / "opt" / "bin" / "srvd").exists()
    r = run_module(noports_runtime, {"prefix": str(tmp_path / "opt"), "state": "absent"})
    assert not r["changed"]


def test_unsafe_payload_is_refused(tmp_path, payload, run_module):
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(payload[0]) as src, tarfile.open(bad, "w:gz") as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        evil = tarfile.TarInfo("noports/../../evil")
        evil.size = 1
        dst.addfile(evil, io.BytesIO(b"x"))
    r = run_module(noports_runtime, args(tmp_path, (bad, None)))
    assert r["failed"] and "outside the package" in r["msg"]
    assert not (tmp_path / "evil").exists()


def test_unknown_script(tmp_path, payload, run_module):
    r = run_module(noports_runtime, args(tmp_path, payload, scripts=["nope"]))
    assert r["failed"] and "nope" in r["msg"]
