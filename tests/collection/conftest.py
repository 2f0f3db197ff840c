"""Fixtures for the collection QA tests: clean ``ansible_collections/noports/sshnp`` copies,
the built artifact and its installed copy.

Why a copy: ansible-test runs only from inside ``…/ansible_collections/<ns>/<name>/`` and
must not see ``.venv``/``.git``/caches; ``scripts/collection_tree.py`` builds it (the same
file list ``ansible-galaxy collection build`` ships, see galaxy.yml ``build_ignore``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from qa_tools import REPO, ensure_get_pip_shim, run, tool, tool_env


def pytest_configure(config: pytest.Config) -> None:
    # Also listed in pyproject.toml; registered here so the directory works on its own.
    config.addinivalue_line(
        "markers", "collection: runs the Ansible collection QA tools (ansible-test, "
        "ansible-lint, ansible-doc, ansible-galaxy) on a copy of the collection")


def _load_collection_tree():
    import importlib.util

    spec = importlib.util.spec_from_file_location("collection_tree",
                                                  REPO / "scripts" / "collection_tree.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def collection_tree_mod():
    return _load_collection_tree()


@pytest.fixture(scope="session")
def collection(tmp_path_factory, collection_tree_mod) -> Path:
    """``…/ansible_collections/noports/sshnp`` holding what the artifact ships (+ galaxy.yml)."""
    return collection_tree_mod.build_tree(tmp_path_factory.mktemp("shipped"), REPO)


@pytest.fixture(scope="session")
def full_collection(tmp_path_factory, collection_tree_mod) -> Path:
    """The whole repository (git's file list) as ``…/ansible_collections/noports/sshnp``."""
    return collection_tree_mod.build_tree(tmp_path_factory.mktemp("full"), REPO, full=True)


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, full_collection) -> Path:
    """``ansible-galaxy collection build`` of the full tree (so build_ignore is exercised)."""
    out = tmp_path_factory.mktemp("dist")
    proc = run([tool("ansible-galaxy"), "collection", "build", "--output-path", str(out)],
               cwd=full_collection, env=tool_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    tars = list(out.glob("noports-sshnp-*.tar.gz"))
    assert len(tars) == 1, tars
    return tars[0]


@pytest.fixture(scope="session")
def installed(tmp_path_factory, artifact) -> Path:
    """The artifact installed with ``ansible-galaxy collection install <tar> -p <dir>``."""
    dest = tmp_path_factory.mktemp("installed")
    proc = run([tool("ansible-galaxy"), "collection", "install", str(artifact), "-p", str(dest)],
               cwd=dest, env=tool_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "ansible_collections" / "noports" / "sshnp" / "MANIFEST.json").is_file()
    return dest


@pytest.fixture(scope="session")
def pip_bootstrap() -> Path | None:
    """ansible-test's get-pip, for the sanity venvs it creates (qa_tools.GET_PIP_SHIM)."""
    return ensure_get_pip_shim()
