"""docs/support.md (and the device Python table of docs/sshnpd.md) agree with the tests.

Every "shown by" cell names tests that exist (``path`` or ``path::test_name``) or says "not
tested"; the device Python rows are exactly the interpreters and ``cryptography`` pins that
tests/integration/test_old_pythons.py runs, plus the project's own ``requires-python``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUPPORT = REPO / "docs" / "support.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?`")


def tables(text: str) -> list[list[dict[str, str]]]:
    """Markdown tables as lists of {header: cell}."""
    out, rows, header = [], [], None
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            # a | inside `code` or escaped (\|) is not a cell boundary
            body = re.sub(r"`[^`]*`", lambda m: m.group(0).replace("|", "\0"),
                          line.strip().strip("|").replace("\\|", "\0"))
            cells = [c.strip().replace("\0", "|") for c in body.split("|")]
            if header is None:
                header = cells
            elif not set("".join(cells)) <= set("-: "):
                rows.append(dict(zip(header, cells, strict=True)))
        elif header is not None:
            out.append(rows)
            rows, header = [], None
    return out


def old_python_pins() -> dict[str, str]:
    """{"3.8": "3.1", ...} from test_old_pythons.OLD_PYTHONS, read without importing it."""
    tree = ast.parse((REPO / "tests" / "integration" / "test_old_pythons.py").read_text())
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "OLD_PYTHONS":
            value = node.value
            assert isinstance(value, ast.Dict)
            pins = {}
            for key, val in zip(value.keys, value.values, strict=True):
                reqs = [e.value for e in val.elts[1].elts]  # (interpreter, [pins])
                crypto = [r.split("==")[1] for r in reqs if r.startswith("cryptography==")]
                pins[key.value] = crypto[0]
            return pins
    raise AssertionError("OLD_PYTHONS not found in test_old_pythons.py")


def test_every_shown_by_cell_names_existing_tests():
    checked = 0
    for table in tables(SUPPORT.read_text()):
        for row in table:
            cell = row.get("shown by")
            if cell is None:
                continue
            refs = TEST_REF.findall(cell)
            assert refs or cell.lower().startswith("not tested"), row
            for path, name in refs:
                source = REPO / path
                assert source.is_file(), f"{path} (docs/support.md) does not exist"
                if name:
                    assert re.search(rf"^def {name}\(", source.read_text(), re.M), (
                        f"{path} has no test {name} (docs/support.md)")
                checked += 1
    assert checked >= 8


def test_device_python_rows_match_the_tested_interpreters():
    pins = old_python_pins()
    requires = re.search(r'^requires-python = ">=(\d+\.\d+)"$',
                         (REPO / "pyproject.toml").read_text(), re.M)
    assert requires, "pyproject.toml: requires-python is not '>=X.Y'"
    newest = requires.group(1)
    for doc, py_col, crypto_col in ((SUPPORT, "device Python", "cryptography"),
                                    (REPO / "docs" / "sshnpd.md", "Device Python",
                                     "cryptography tested")):
        rows = [r for t in tables(doc.read_text()) for r in t if py_col in r]
        assert rows, f"no device Python table in {doc.name}"
        documented = {r[py_col].split()[0]: r for r in rows}
        assert set(documented) == set(pins) | {newest}, (doc.name, sorted(documented))
        for version, pin in pins.items():
            assert documented[version][crypto_col].split()[0] == pin, (doc.name, version)
        assert documented[newest][py_col].startswith(f"{newest} and later"), doc.name
