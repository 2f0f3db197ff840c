"""Build the noports runtime payload the roles ship to hosts (controller side, stdlib only).

Why a payload and not a wheel: building a wheel needs setuptools (and often the network) on the
controller, and installing one needs pip on the device. The payload is a deterministic tar.gz
of the collection's own ``src/noports`` plus a manifest (version, console scripts,
requirements), so ``ansible.builtin.copy`` transfers it only when the code changed, and the
``noports.sshnp.noports_runtime`` module installs it with nothing but Python on the host.

Usage: noports_payload.py --root COLLECTION_ROOT --out DIR
Prints one JSON line: {"path": ..., "sha256": ..., "version": ..., "changed": bool}.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import sys
import tarfile

MTIME = int(os.environ.get("SOURCE_DATE_EPOCH", "315532800"))  # 1980-01-01: stable bytes
MANIFEST = "noports-payload.json"
SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".tmp", "~")
# console scripts the runtime provides even before pyproject.toml lists them
KNOWN_SCRIPTS = {
    "sshnpd": ("noports.daemon.cli:main", "noports/daemon/cli.py"),
    "srvd": ("noports.relay.srvd_cli:main", "noports/relay/srvd_cli.py"),
    "sshnp": ("noports.client.cli:main", "noports/client/cli.py"),
}


def read_project(pyproject: str) -> dict:
    """name, version, dependencies and scripts of [project] (tomllib, or a small fallback)."""
    with open(pyproject, "rb") as fh:
        raw = fh.read()
    try:
        import tomllib
    except ImportError:  # Python 3.10 controllers
        return _read_project_fallback(raw.decode("utf-8"))
    data = tomllib.loads(raw.decode("utf-8"))
    project = data.get("project", {})
    return {"name": project.get("name", "noports"), "version": project.get("version", "0"),
            "dependencies": list(project.get("dependencies", [])),
            "scripts": dict(project.get("scripts", {}))}


def _read_project_fallback(text: str) -> dict:
    section = ""
    out: dict = {"name": "noports", "version": "0", "dependencies": [], "scripts": {}}
    in_deps = False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("["):
            section, in_deps = s.strip("[]"), False
            continue
        if section == "project":
            m = re.match(r'(name|version)\s*=\s*"([^"]*)"', s)
            if m:
                out[m.group(1)] = m.group(2)
            if s.startswith("dependencies"):
                in_deps = True
            if in_deps:
                out["dependencies"] += re.findall(r'"([^"]+)"', s.split("=", 1)[-1]
                                                  if s.startswith("dependencies") else s)
                if "]" in s:
                    in_deps = False
        elif section == "project.scripts":
            m = re.match(r'([\w.-]+)\s*=\s*"([^"]+)"', s)
            if m:
                out["scripts"][m.group(1)] = m.group(2)
    return out


def _files(src: str):
    for base, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(names):
            if name.endswith(SKIP_SUFFIXES) or name.startswith("."):
                continue
            yield os.path.join(base, name)


def build(root: str) -> tuple[bytes, dict]:
    """(tar.gz bytes, manifest) for the collection at ``root``; same input -> same bytes."""
    src = os.path.join(root, "src", "noports")
    if not os.path.isfile(os.path.join(src, "__init__.py")):
        raise SystemExit(f"noports_payload: {src} is not the noports package")
    project = read_project(os.path.join(root, "pyproject.toml"))
    scripts = dict(project["scripts"])
    for name, (target, rel) in KNOWN_SCRIPTS.items():
        if name not in scripts and os.path.isfile(os.path.join(root, "src", rel)):
            scripts[name] = target
    manifest = {"name": project["name"], "version": project["version"],
                "entry_points": dict(sorted(scripts.items())),
                "requires": project["dependencies"]}
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(arcname: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(arcname)
            info.size, info.mtime, info.mode = len(data), MTIME, mode
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))

        add(MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        for path in _files(src):
            rel = os.path.relpath(path, os.path.dirname(src)).replace(os.sep, "/")
            with open(path, "rb") as fh:
                add(rel, fh.read())
    return buf.getvalue(), manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="collection root (has src/noports)")
    ap.add_argument("--out", required=True, help="directory for the payload")
    args = ap.parse_args(argv)
    data, manifest = build(os.path.abspath(args.root))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(os.path.abspath(args.out), f"noports-{manifest['version']}-payload.tar.gz")
    try:
        with open(path, "rb") as fh:
            changed = fh.read() != data
    except FileNotFoundError:
        changed = True
    if changed:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    print(json.dumps({"path": path, "sha256": hashlib.sha256(data).hexdigest(),
                      "version": manifest["version"], "changed": changed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
