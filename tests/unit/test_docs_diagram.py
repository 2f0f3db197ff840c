"""The session-flow diagram in docs/ is rendered from its source, and says all 14 steps.

Why: the PNG/SVG are committed (readers on a forge see them without Graphviz), so nothing
rebuilds them; this catches an edit to ``session_flow.py`` whose images were not re-rendered,
and a diagram that lost a step of the flow that docs/concepts.md numbers 1-14.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

IMG = Path(__file__).resolve().parents[2] / "docs" / "img"


def test_dot_source_matches_the_generator() -> None:
    out = subprocess.run([sys.executable, str(IMG / "session_flow.py")], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    assert out == (IMG / "session-flow.dot").read_text(), (
        "docs/img/session-flow.dot is stale: run scripts/render_diagrams.sh")


def test_svg_is_a_rendering_of_the_dot_source() -> None:
    svg = (IMG / "session-flow.svg").read_text()
    dot = (IMG / "session-flow.dot").read_text()
    steps = {int(n) for n in re.findall(r">(\d{1,2})</text>", svg)}
    assert steps == set(range(1, 15)), f"steps in the SVG: {sorted(steps)}"
    # every word of every step label of the source is in the SVG (not an older rendering)
    labels = re.findall(r"<b>\d{1,2}</b>(.*?)>, ", dot)
    assert len(labels) == 14
    svg_words = set(re.findall(r"\w{4,}", svg))
    missing = {w for lab in labels for w in re.findall(r"\w{4,}", lab)} - svg_words
    assert not missing, f"words of the source missing in the SVG: {sorted(missing)}"
    assert (IMG / "session-flow.png").stat().st_size > 10_000
