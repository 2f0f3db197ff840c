"""Helpers of the collection QA tests: run the tools of this interpreter's environment, and
give ansible-test the pip bootstrap it would otherwise download."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv whose ansible-core/ansible-lint are tested
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"
SHIM_MARK = "noports.sshnp tests/collection get-pip stand-in"


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in {BIN} (pip install -e .[test])")
    return str(path)


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for the tools: this venv first on PATH, no user/site Ansible config."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANSIBLE_", "PYTEST_", "COV_")) and k != "PYTHONPATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("LC_ALL", "C.UTF-8")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 300,
        ) -> subprocess.CompletedProcess[str]:
    """Run a tool, echo its command/output/time (shown with -rA or on failure)."""
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    took = time.monotonic() - start
    print(f"$ (cd {cwd} && {' '.join(argv)})  # rc={proc.returncode} {took:.1f}s")
    print(proc.stdout[-20000:])
    print(proc.stderr[-20000:], file=sys.stderr)
    return proc


def _ansible_test_pip_version() -> str | None:
    """The pip version ansible-test bootstraps into its venvs (``get_venv_packages``)."""
    try:
        import ansible_test
    except ImportError:
        return None
    src = Path(ansible_test.__file__).parent / "_internal" / "python_requirements.py"
    m = re.search(r"default_packages = dict\(\s*pip='([0-9.]+)'", src.read_text())
    return m.group(1) if m else None


GET_PIP_SHIM = f'''\
# {SHIM_MARK}
# ansible-test bootstraps pip into the empty venvs it creates with get-pip-<version>.py
# downloaded from ci-files.testing.ansible.com, which CI cannot reach. This replacement
# installs the pip wheel bundled with CPython (ensurepip, offline), then uses it to install
# what get-pip was asked for (pip==<version>) from the configured index (PyPI).
import ensurepip
import os
import subprocess
import sys

args = sys.argv[1:]
env = dict(os.environ)  # ensurepip drops PIP_* and sets PIP_CONFIG_FILE=/dev/null in os.environ
ensurepip.bootstrap(upgrade=True)
pkgs = [a for a in args if not a.startswith("-")]
opts = [a for a in args if a.startswith("-") and a not in ("--no-setuptools", "--no-wheel")]
if pkgs:
    subprocess.check_call([sys.executable, "-m", "pip", "install", *opts, *pkgs], env=env)
if "--no-setuptools" in args:
    subprocess.call([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], env=env)
'''


def ensure_get_pip_shim(home: Path | None = None) -> Path | None:
    """Put the get-pip stand-in where ansible-test looks first (its download cache).

    A real get-pip script already cached there is kept; an older stand-in is replaced.
    """
    version = _ansible_test_pip_version()
    if version is None:
        return None
    base = home if home is not None else Path(os.path.expanduser("~"))
    path = base / ".ansible" / "test" / "cache" / f"get_pip_{version.replace('.', '_')}.py"
    if path.exists():
        text = path.read_text(errors="replace")
        is_stand_in = SHIM_MARK in text or (len(text) < 4096 and "ensurepip" in text)
        if not is_stand_in or text == GET_PIP_SHIM:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(GET_PIP_SHIM)
    tmp.replace(path)
    return path


