#!/usr/bin/env python3
"""Copy this repository to ``<dest>/ansible_collections/noports/sshnp`` for the collection tools.

Why: ``ansible-test`` only runs from inside ``…/ansible_collections/<namespace>/<name>/``, and
the tools must see the collection as checked out, not a developer's virtualenv or caches.

Source files are those git would check out (tracked plus untracked-but-not-ignored, from the
read-only ``git ls-files``), or, outside a git checkout, every file not under EXCLUDE_DIRS /
EXCLUDE_GLOBS. By default the ``build_ignore`` patterns of ``galaxy.yml`` are then applied with
``ansible-galaxy``'s own rule (``fnmatch`` on the relative path, for files and directories),
so the tree is exactly what the collection artifact ships plus ``galaxy.yml``: the tree that
``ansible-test sanity``/``units`` check. ``--full`` keeps everything (the repository's whole
Ansible content, for ``ansible-lint``). Symlinks are copied as links. The repository is only
read.

Usage: scripts/collection_tree.py DEST [--full]   # prints the collection path
       scripts/collection_tree.py --list [--full] # prints the files that would be copied
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMESPACE, NAME = "noports", "sshnp"

# Directory names skipped anywhere, and repo-relative paths/globs skipped (build artefacts,
# virtualenvs, tool caches, ansible-test output). Matches .gitignore plus .git itself.
EXCLUDE_DIRS = {
    ".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
    ".mypy_cache", ".tox", ".nox", ".state", "build", "dist", ".ansible",
}
EXCLUDE_GLOBS = ["*.pyc", "*.pyo", "*.egg-info", "*.egg-info/*", "tests/output/*", "*.tar.gz"]


def _excluded(rel: str) -> bool:
    parts = rel.split("/")
    if any(p in EXCLUDE_DIRS for p in parts[:-1]) or parts[-1] in EXCLUDE_DIRS:
        return True
    if any(p.endswith(".egg-info") for p in parts):
        return True
    return any(fnmatch.fnmatch(rel, g) for g in EXCLUDE_GLOBS)


def repo_files(repo: Path = REPO) -> list[str]:
    """Repository-relative paths (POSIX) of the files that make up the collection source."""
    files: list[str] | None = None
    if (repo / ".git").exists() and shutil.which("git"):
        proc = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, check=False,
        )
        if proc.returncode == 0:
            files = [f for f in proc.stdout.decode().split("\0") if f]
            # --cached lists files deleted from the work tree but not yet from the index.
            files = [f for f in files if os.path.lexists(repo / f)]
    if files is None:
        files = []
        for root, dirs, names in os.walk(repo):
            rel_root = os.path.relpath(root, repo)
            dirs[:] = sorted(d for d in dirs if d not in EXCLUDE_DIRS and not d.endswith(".egg-info"))
            for n in names:
                files.append(n if rel_root == "." else f"{rel_root}/{n}".replace(os.sep, "/"))
    return sorted(f for f in files if not _excluded(f))


def build_ignore(repo: Path = REPO) -> list[str]:
    """galaxy.yml's ``build_ignore`` plus the patterns ansible-galaxy always ignores."""
    import yaml  # PyYAML comes with ansible-core

    meta = yaml.safe_load((repo / "galaxy.yml").read_text()) or {}
    return [".git", "*.pyc", "*.retry", "tests/output", f"{NAMESPACE}-{NAME}-*.tar.gz",
            *(meta.get("build_ignore") or [])]


def shipped(files: list[str], patterns: list[str]) -> list[str]:
    """Drop what ``ansible-galaxy collection build`` would skip: a file matching a pattern, or
    under a directory matching one (``fnmatch`` on the relative path, ``*`` crosses ``/``)."""
    out = []
    for rel in files:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if not any(fnmatch.fnmatch(p, pat) for p in prefixes for pat in patterns):
            out.append(rel)
    return out


def tree_files(repo: Path = REPO, full: bool = False) -> list[str]:
    files = repo_files(repo)
    return files if full else shipped(files, build_ignore(repo)) + ["galaxy.yml"]


def build_tree(dest: Path, repo: Path = REPO, full: bool = False) -> Path:
    """Create ``dest/ansible_collections/noports/sshnp`` (replacing it) and return its path."""
    coll = Path(dest) / "ansible_collections" / NAMESPACE / NAME
    if coll.exists():
        shutil.rmtree(coll)
    coll.mkdir(parents=True)
    for rel in sorted(set(tree_files(repo, full))):
        src, dst = repo / rel, coll / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return coll


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", nargs="?", help="directory that will hold ansible_collections/")
    ap.add_argument("--list", action="store_true", help="only list the files")
    ap.add_argument("--full", action="store_true", help="do not apply galaxy.yml build_ignore")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(sorted(set(tree_files(full=args.full)))))
        return 0
    if not args.dest:
        ap.error("DEST is required unless --list")
    print(build_tree(Path(args.dest), full=args.full))
    return 0


if __name__ == "__main__":
    sys.exit(main())
