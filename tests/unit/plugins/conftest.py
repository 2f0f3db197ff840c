"""Make ``ansible_collections.noports.sshnp`` importable under plain pytest.

Why: ``make test`` runs pytest from the repository, which is not laid out as
``ansible_collections/noports/sshnp``. A temporary tree with a symlink to the repo gives the
plugins (and Ansible's plugin loader, doc fragments included) their collection names, the
same way ``ansible-test units`` sees them. Under ansible-test the collection finder is already
installed and nothing is done. Without ansible-core the tests here are skipped.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ansible", reason="ansible-core is not installed (pip install -e .[test])")

REPO = Path(__file__).resolve().parents[3]


def _finder_installed() -> bool:
    return any(type(f).__name__ == "_AnsibleCollectionFinder" for f in sys.meta_path)


def _collections_root() -> Path:
    """A directory holding ``ansible_collections/noports/sshnp`` for this checkout."""
    if REPO.parent.name == "noports" and REPO.parent.parent.name == "ansible_collections":
        return REPO.parent.parent.parent
    base = Path(tempfile.mkdtemp(prefix="sshnp-ac-"))
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    (base / "ansible_collections" / "noports").mkdir(parents=True)
    (base / "ansible_collections" / "noports" / "sshnp").symlink_to(REPO)
    return base


if not _finder_installed():
    from ansible.plugins.loader import init_plugin_loader

    init_plugin_loader([str(_collections_root())])
