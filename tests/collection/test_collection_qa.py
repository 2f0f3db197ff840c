"""The collection passes Ansible's own QA tools, and its built artifact installs and works.

Each test runs the real tool on a copy of the collection (``conftest.py``); the commands are
printed, so ``pytest -m collection -rA`` shows exactly what ran (docs/testing.md).
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
import yaml
from qa_tools import PYVER, REPO, run, tool, tool_env

pytestmark = pytest.mark.collection

FQCN = "noports.sshnp"
# plugin directory -> ansible-doc type; every public .py file in these is documented
DOC_TYPES = {"connection": "connection", "inventory": "inventory", "modules": "module"}


def _plugins() -> list[tuple[str, str]]:
    out = []
    for directory, kind in DOC_TYPES.items():
        for path in sorted((REPO / "plugins" / directory).glob("*.py")):
            if not path.name.startswith("_"):
                out.append((kind, path.stem))
    out += [("role", p.parent.parent.name)
            for p in sorted((REPO / "roles").glob("*/meta/argument_specs.yml"))]
    return out


PLUGINS = _plugins()


def test_sanity_ignore_files_are_empty():
    """Problems are fixed, not ignored: tests/sanity/ignore-*.txt are absent or empty."""
    for path in (REPO / "tests" / "sanity").glob("ignore-*.txt"):
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        assert lines == [], f"{path.relative_to(REPO)} must stay empty"


def test_artifact_tree_ships_the_runtime_and_nothing_of_the_dev_setup(collection):
    files = {str(p.relative_to(collection)) for p in collection.rglob("*") if p.is_file()}
    for needed in ("galaxy.yml", "meta/runtime.yml", "COPYING", "LICENSES/BSD-3-Clause.txt",
                   "pyproject.toml", "scripts/noports_payload.py", "src/noports/__init__.py",
                   "plugins/connection/sshnp.py", "changelogs/changelog.yaml"):
        assert needed in files, needed
    for prefix in (".venv/", ".git/", "bench/", "tests/integration/", "tests/collection/",
                   ".pytest_cache/", ".ruff_cache/", ".hypothesis/"):
        assert not any(f.startswith(prefix) for f in files), prefix
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


@pytest.mark.timeout(480)  # first run on a fresh machine creates ~8 venvs from PyPI
def test_ansible_test_sanity(collection, pip_bootstrap):
    """``ansible-test sanity`` with empty ignore files, every test ansible-test lists."""
    ansible_test = tool("ansible-test")
    env = tool_env()
    listed = run([ansible_test, "sanity", "--list-tests", "--local", "--python", PYVER],
                 cwd=collection, env=env, timeout=60)
    assert listed.returncode == 0, listed.stderr
    expected = [ln.strip() for ln in listed.stdout.splitlines() if re.fullmatch(r"[a-z0-9-]+", ln.strip())]
    assert {"validate-modules", "pylint", "pep8", "ansible-doc", "import", "yamllint",
            "runtime-metadata", "compile"} <= set(expected), expected

    proc = run([ansible_test, "sanity", "--local", "--python", PYVER, "--color", "no",
                "--truncate", "0"], cwd=collection, env=env, timeout=450)
    out = proc.stdout + proc.stderr
    ran = re.findall(r'Running sanity test "([^"]+)"', out)
    skipped = re.findall(r"WARNING: (Skipping sanity test[^\n]*|Required program[^\n]*)", out)
    print("ran:", ", ".join(ran))
    print("skipped by ansible-test:", skipped or "none")
    errors = [ln for ln in out.splitlines() if ln.startswith(("ERROR:", "FATAL:"))]
    assert proc.returncode == 0, "\n".join(errors) or out[-3000:]
    assert set(expected) <= set(ran), sorted(set(expected) - set(ran))


def test_ansible_test_units(collection):
    """``ansible-test units`` (modules and controller contexts) in this environment."""
    # ansible-test units --local runs `pytest -n auto` with pytest-mock: they must be in .[test]
    import importlib.util

    missing = [m for m in ("xdist", "pytest_mock", "mock") if importlib.util.find_spec(m) is None]
    assert not missing, f"ansible-test units --local needs {missing} (pyproject [test] extras)"
    proc = run([tool("ansible-test"), "units", "--local", "--python", PYVER, "--color", "no"],
               cwd=collection, env=tool_env(), timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "Unit test modules with Python" in out and "Unit test controller with Python" in out
    summaries = re.findall(r"=+ (\d+ passed.*?) in [0-9.]+s =+", out)
    print("summaries:", summaries)
    assert len(summaries) == 2 and all("failed" not in s and "error" not in s for s in summaries)


def test_ansible_lint_production_profile(full_collection):
    """``ansible-lint --profile production`` over the whole repository's Ansible content."""
    proc = run([tool("ansible-lint"), "--profile", "production", "--offline", "--nocolor"],
               cwd=full_collection,
               env=tool_env(ANSIBLE_COLLECTIONS_PATH=str(full_collection.parents[2])),
               timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "Profile 'production' was required, and it passed" in out


@pytest.fixture(scope="module")
def doc_json(collection):
    """``ansible-doc --json`` of every plugin, module and role, from the source tree."""
    env = tool_env(ANSIBLE_COLLECTIONS_PATH=str(collection.parents[2]))
    out = {}
    for kind in sorted({k for k, _ in PLUGINS}):
        names = [f"{FQCN}.{n}" for k, n in PLUGINS if k == kind]
        proc = run([tool("ansible-doc"), "-t", kind, "--json", *names], cwd=collection,
                   env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "ERROR" not in proc.stderr, proc.stderr
        out[kind] = json.loads(proc.stdout)
    return out


@pytest.mark.parametrize(("kind", "name"), PLUGINS, ids=[f"{k}:{n}" for k, n in PLUGINS])
def test_ansible_doc_renders(collection, doc_json, kind, name):
    fqcn = f"{FQCN}.{name}"
    data = doc_json[kind].get(fqcn)
    assert data, f"ansible-doc -t {kind} {fqcn} returned nothing"
    if kind == "role":
        assert data["entry_points"]["main"]["short_description"]
        return
    assert data["doc"]["short_description"]
    assert data["doc"].get("options") is not None
    proc = run([tool("ansible-doc"), "-t", kind, fqcn], cwd=collection,
               env=tool_env(ANSIBLE_COLLECTIONS_PATH=str(collection.parents[2])), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert fqcn in proc.stdout and "OPTIONS" in proc.stdout


def test_ansible_doc_list_has_everything(collection):
    env = tool_env(ANSIBLE_COLLECTIONS_PATH=str(collection.parents[2]))
    for kind in sorted({k for k, _ in PLUGINS} - {"role"}):
        proc = run([tool("ansible-doc"), "-t", kind, "-l", FQCN, "--json"], cwd=collection,
                   env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert set(json.loads(proc.stdout)) == {f"{FQCN}.{n}" for k, n in PLUGINS if k == kind}


def test_galaxy_build_artifact_contents(artifact):
    with tarfile.open(artifact) as tar:
        names = set(tar.getnames())
        manifest = json.load(tar.extractfile("MANIFEST.json"))
    info = manifest["collection_info"]
    galaxy = yaml.safe_load((REPO / "galaxy.yml").read_text())
    assert (info["namespace"], info["name"], info["version"]) == ("noports", "sshnp",
                                                                 galaxy["version"])
    assert info["license"] == ["GPL-3.0-or-later", "BSD-3-Clause"]
    for needed in ("src/noports/__init__.py", "src/noports/daemon", "pyproject.toml",
                   "scripts/noports_payload.py", "roles/sshnpd/tasks/main.yml",
                   "plugins/modules/noports_runtime.py", "COPYING", "LICENSES/BSD-3-Clause.txt",
                   "meta/runtime.yml"):
        assert needed in names, needed
    for banned in ("bench", "tests/integration", "tests/collection", ".venv", ".git", ".ci",
                   "tests/fixtures", "Makefile", "scripts/bootstrap.sh"):
        assert not any(n == banned or n.startswith(banned + "/") for n in names), banned
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    size = artifact.stat().st_size
    print(f"{artifact.name}: {size} bytes, {len(names)} entries")
    assert size < 1_000_000


def test_installed_collection_documents_its_plugins(installed):
    env = tool_env(ANSIBLE_COLLECTIONS_PATH=str(installed))
    proc = run([tool("ansible-doc"), "-t", "connection", f"{FQCN}.sshnp"], cwd=installed,
               env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert str(installed) in proc.stdout  # rendered from the installed copy, not the checkout
    proc = run([tool("ansible-galaxy"), "collection", "list", FQCN, "-p", str(installed)],
               cwd=installed, env=env, timeout=60)
    assert proc.returncode == 0 and FQCN in proc.stdout, proc.stderr


def test_installed_collection_runs_a_play(installed, tmp_path):
    """A trivial play with ``ansible_connection: local`` using a module of the installed copy."""
    conf = tmp_path / "sshnpd.conf"
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump({"all": {"hosts": {"localhost": {
        "ansible_connection": "local", "ansible_python_interpreter": str(Path(tool("python")))}}}}))
    (tmp_path / "play.yml").write_text(yaml.safe_dump([{
        "name": "Write an sshnpd config with the installed collection",
        "hosts": "localhost", "gather_facts": False,
        "tasks": [{"name": "Configure sshnpd", "noports.sshnp.sshnpd_config": {
            "path": str(conf), "atsign": "@qa_device", "managers": ["@qa_client"],
            "device": "qa"}, "register": "result"},
            {"name": "Check the result", "ansible.builtin.assert": {
                "that": ["(result is changed) == (expect_change | bool)"]}}]}]))
    env = tool_env(ANSIBLE_COLLECTIONS_PATH=str(installed), ANSIBLE_LOCAL_TEMP=str(tmp_path / "t"),
                   ANSIBLE_HOME=str(tmp_path / "home"))
    argv = [tool("ansible-playbook"), "-i", str(tmp_path / "inventory.yml"),
            str(tmp_path / "play.yml")]
    proc = run([*argv, "-e", "expect_change=true"], cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert conf.is_file() and "@qa_device" in conf.read_text()
    again = run([*argv, "-e", "expect_change=false"], cwd=tmp_path, env=env, timeout=120)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    assert re.search(r"localhost\s*:\s*ok=2\s+changed=0", again.stdout), again.stdout[-2000:]
