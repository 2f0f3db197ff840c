"""docs/ansible-modules.md and docs/ansible-roles.md match the modules' and roles' own docs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[4]


def _renderer():
    spec = importlib.util.spec_from_file_location(
        "render_ansible_docs", REPO / "scripts" / "render_ansible_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_docs_are_up_to_date():
    for path, text in _renderer().outputs().items():
        assert path.read_text() == text, (
            f"{path.name} is stale: run .venv/bin/python scripts/render_ansible_docs.py")


def test_role_specs_cover_every_default():
    """Every variable in defaults/main.yml is documented in meta/argument_specs.yml."""
    for role in ("sshnpd", "srvd", "control_plane"):
        defaults = yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text())
        spec = yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml").read_text())
        options = spec["argument_specs"]["main"]["options"]
        assert set(defaults) == set(options), (role, set(defaults) ^ set(options))
        for name, opt in options.items():
            assert opt.get("description"), (role, name)


def test_module_docs_parse():
    mod = _renderer()
    for name in mod.MODULES:
        blocks = mod._module_blocks(REPO / "plugins" / "modules" / f"{name}.py")
        doc = yaml.safe_load(blocks["DOCUMENTATION"])
        assert doc["module"] == name
        yaml.safe_load(blocks["EXAMPLES"])
        yaml.safe_load(blocks["RETURN"])
