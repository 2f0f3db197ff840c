"""noports.compat: the shims that let sshnpd/srvd run on Python 3.8/3.9.

Also run under 3.8/3.9 by tests/integration/test_old_pythons.py, where the TOML subset parser
is the one in use (no tomllib there, and tomli is not installed in those venvs).
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.compat import TOMLDecodeError, _toml_subset, to_thread, toml_loads

CONFIG = """
# sshnpd config
atsign = "@device"          # the device's atSign
managers = ["@a", '@b']
"permit-open" = ["localhost:22", "127.0.0.1:3389"]
sshpublickey = true
hide = false
ephemeral_key_ttl = 3
ratio = 1.5
quote = "say \\"hi\\"\\n"
"""
EXPECTED = {"atsign": "@device", "managers": ["@a", "@b"],
            "permit-open": ["localhost:22", "127.0.0.1:3389"], "sshpublickey": True,
            "hide": False, "ephemeral_key_ttl": 3, "ratio": 1.5, "quote": 'say "hi"\n'}


def test_subset_reads_a_daemon_config():
    assert _toml_subset(CONFIG) == EXPECTED
    assert toml_loads(CONFIG) == EXPECTED  # whichever parser this Python uses


@pytest.mark.parametrize("text, msg", [
    ("[section]\na = 1\n", "line 1: only flat `key = value`"),
    ("a = 1\nb = [1,\n2]\n", "line 2: unterminated array"),
    ('a = "x\n', "line 1: unterminated string"),
    ("a = 1\na = 2\n", "line 2: duplicate key 'a'"),
    ("a = 1 2\n", "line 1: unexpected text after the value"),
    ("a = 1979-05-27\n", "line 1: unexpected text|line 1: unsupported value"),
    ("a = nope\n", "line 1: unsupported value"),
])
def test_subset_refuses_what_it_cannot_read_naming_the_line(text, msg):
    with pytest.raises(TOMLDecodeError, match=msg):
        _toml_subset(text)


_scalar = st.one_of(
    st.booleans(), st.integers(-10**12, 10**12),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12))


def _dump(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_dump(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


@pytest.mark.skipif(sys.version_info < (3, 11), reason="differential check needs tomllib")
@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,10}", fullmatch=True),
                       st.one_of(_scalar, st.lists(_scalar, max_size=4)), max_size=6))
def test_subset_agrees_with_tomllib(doc):
    import tomllib

    text = "".join(f"{k} = {_dump(v)}  # c\n" for k, v in doc.items())
    assert _toml_subset(text) == tomllib.loads(text) == doc


def test_to_thread_runs_off_loop_with_the_callers_context():
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var")

    def work(x: int, *, y: int) -> tuple[int, str, bool]:
        return x + y, var.get(), threading.current_thread() is threading.main_thread()

    async def main() -> tuple[int, str, bool]:
        var.set("caller")
        return await to_thread(work, 1, y=2)

    assert asyncio.run(main()) == (3, "caller", False)
