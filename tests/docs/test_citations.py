"""Citations of the reference pages resolve, and nothing points outside the repository.

The form is described in docs/reference/README.md ("Citation form"): in code and fixtures
``docs/reference/<page>.md#<anchor>``, in Markdown a relative link to the same place. The
anchor is the GitHub anchor of one of the page's headings. Old numbered citations (a section
sign and a number, which pointed at notes outside the repository) are reported, and so is any
path into a ``shared`` directory beside the checkout: a clone has none.

Also here, because they are the same kind of drift between documents: role metadata carries the
licence decision 0008 gives to roles/, and docs/index.md links the reference pages.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SCAN = ("src", "plugins", "tests", "bench", "roles", "docs")
SKIP_DIRS = {".git", ".venv", "__pycache__", "node_modules", ".pytest_cache", ".ruff_cache",
             ".mypy_cache", "build", "dist", ".tox"}
TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".json", ".j2", ".cfg", ".toml", ".txt",
                 ".sh", ".ini", ".rst", ".in", ""}

SECT = "\u00a7"
OLD_CITATION = re.compile(SECT + r"\s?\d")
# "GPLv3 <section sign>5" is a section of the licence, not of our reference pages
LICENCE_SECTION = re.compile(r"GPL(?:v?3|-3\.0(?:-or-later)?)?\s*$")
CODE_CITATION = re.compile(r"docs/reference/([\w.-]+\.md)(?:#([\w-]+))?")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# built from pieces so that this file does not match itself
OUTSIDE = re.compile("(?:" + r"\.\./" + ")+" + "shared" + r"\b" + "|" + "shared" + "/reference"
                     + "|" + "/work/" + "shared")


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation but '-' and '_' dropped, ' ' -> '-'."""
    h = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return h.replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    """(level, text) of the Markdown headings outside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^(#{1,6})\s+(.+?)\s*#*\s*$", line)
        if m:
            out.append((len(m.group(1)), m.group(2)))
    return out


@functools.cache
def anchors(page: Path) -> frozenset[str]:
    return frozenset(slug(h) for _, h in headings(page.read_text(encoding="utf-8")))


def text_files(root: Path) -> list[Path]:
    files = [p for p in root.glob("*.md") if p.is_file()]
    for d in SCAN:
        for dirpath, dirnames, filenames in os.walk(root / d):
            dirnames[:] = [n for n in dirnames if n not in SKIP_DIRS]
            files += [Path(dirpath) / f for f in filenames if Path(f).suffix in TEXT_SUFFIXES]
    return sorted(files)


def citation_problems(root: Path) -> list[str]:
    """Every broken, old-style or outside-pointing citation under root, one line each."""
    reference = (root / "docs" / "reference").resolve()
    problems = []

    def check(where: str, page: Path, anchor: str | None, shown: str) -> None:
        if not page.is_file():
            problems.append(f"{where}: {shown}: no such page")
        elif anchor and anchor not in anchors(page):
            problems.append(f"{where}: {shown}: {page.name} has no heading with anchor "
                            f"#{anchor}")

    for path in text_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        rel = path.relative_to(root).as_posix()
        for lineno, line in enumerate(text.splitlines(), 1):
            where = f"{rel}:{lineno}"
            for m in OLD_CITATION.finditer(line):
                if not LICENCE_SECTION.search(line[:m.start()]):
                    problems.append(f"{where}: old numbered citation {line[m.start():m.end() + 4]!r}"
                                    f": cite docs/reference/<page>.md#<anchor>")
            if OUTSIDE.search(line):
                problems.append(f"{where}: points outside the repository: {line.strip()[:100]}")
            for m in CODE_CITATION.finditer(line):
                check(where, root / "docs" / "reference" / m.group(1), m.group(2), m.group(0))
        if path.suffix == ".md":
            body = FENCE.sub("", text)
            for target in MD_LINK.findall(body):
                if re.match(r"^[a-z]+:", target):
                    continue
                file_part, _, anchor = target.partition("#")
                page = (path.parent / file_part).resolve() if file_part else path.resolve()
                if page.parent == reference:
                    check(rel, page, anchor or None, target)
    return problems


def test_every_citation_resolves_and_none_points_outside():
    problems = citation_problems(REPO)
    assert not problems, "\n".join(problems)


def test_citations_are_found_at_all():
    """Guards the scan itself: the tree does cite the reference pages, in code and in docs."""
    code = [p for p in text_files(REPO) if p.suffix == ".py"
            and "docs/reference/" in p.read_text(encoding="utf-8")]
    assert len(code) >= 20, [str(p) for p in code]


def test_checker_reports_each_kind_of_problem(tmp_path):
    REF = "docs/" + "reference/"  # noqa: N806 - in pieces, or the scan of this file reports them
    ref = tmp_path / "docs" / "reference"
    ref.mkdir(parents=True)
    (ref / "atprotocol.md").write_text("# atProtocol\n\n## Keys\n\nUpstream: x\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.py").write_text('"""Key shapes (docs/reference/atprotocol.md#keys)."""\n')
    (src / "bad.py").write_text(
        "# " + REF + "atprotocol.md#no-such-heading\n"
        "# " + REF + "missing.md#keys\n"
        f"# reference {SECT}3.2\n"
        "# see ../" + "shared" + "/reference/atprotocol.md\n"
        f"# aggregation (GPLv3 {SECT}5) is fine\n")
    (tmp_path / "docs" / "page.md").write_text(
        "[ok](reference/atprotocol.md#keys) [bad](reference/atprotocol.md#nope)\n")
    problems = citation_problems(tmp_path)
    assert len(problems) == 5, problems
    joined = "\n".join(problems)
    assert "src/bad.py:1:" in joined and "no heading with anchor #no-such-heading" in joined
    assert f"src/bad.py:2: {REF}missing.md#keys: no such page" in joined
    assert "src/bad.py:3: old numbered citation" in joined
    assert "src/bad.py:4: points outside the repository" in joined
    assert "docs/page.md: reference/atprotocol.md#nope" in joined
    assert "good.py" not in joined and "bad.py:5" not in joined


def test_reference_pages_have_unique_anchors_and_name_their_sources():
    pages = sorted((REPO / "docs" / "reference").glob("*.md"))
    assert {p.name for p in pages} >= {"README.md", "atprotocol.md", "noports-protocol.md",
                                        "ansible-anchors.md"}
    problems = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        hs = headings(text)
        slugs = [slug(h) for _, h in hs]
        dupes = sorted({s for s in slugs if slugs.count(s) > 1})
        if dupes:
            problems.append(f"{page.name}: headings share anchors {dupes}")
        if page.name == "README.md":
            continue
        # split into sections at level-2 and level-3 headings; each must say where it is from,
        # a level-2 section through itself or its subsections
        parts = re.split(r"^(#{2,3} .+)$", FENCE.sub("", text), flags=re.M)
        sections = list(zip(parts[1::2], parts[2::2], strict=True))
        for i, (heading, body) in enumerate(sections):
            title = heading.lstrip("#").strip()
            if title in ("Compatibility checklist",):
                continue
            has = "\nUpstream:" in "\n" + body
            if heading.startswith("## "):
                j = i + 1
                while not has and j < len(sections) and sections[j][0].startswith("### "):
                    has = "\nUpstream:" in "\n" + sections[j][1]
                    j += 1
            if not has:
                problems.append(f"{page.name}: section {title!r} names no upstream source "
                                f"(a line starting 'Upstream:')")
    assert not problems, "\n".join(problems)


def test_index_links_the_reference_pages():
    index = (REPO / "docs" / "index.md").read_text(encoding="utf-8")
    assert "](reference/README.md)" in index


def test_role_metadata_carries_the_licence_of_decision_0008():
    decision = (REPO / "docs" / "decisions" / "0008-collection-license.md").read_text(
        encoding="utf-8")
    assert "`roles/`" in decision and "**GPL-3.0-or-later**" in decision
    metas = sorted((REPO / "roles").glob("*/meta/main.yml"))
    assert metas
    wrong = {m.parent.parent.name: yaml.safe_load(m.read_text())["galaxy_info"]["license"]
             for m in metas}
    wrong = {role: lic for role, lic in wrong.items() if lic != "GPL-3.0-or-later"}
    assert not wrong, f"roles/*/meta/main.yml licence differs from decision 0008: {wrong}"
