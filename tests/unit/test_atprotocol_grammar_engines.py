"""The verb grammar runs on RE2 (linear time) wherever RE2 can say the Dart pattern.

The backtracking engine stays only for the patterns with lookaround; a differential test
shows the RE2 port parses exactly as the backtracking port of the same Dart pattern does.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from noports.atprotocol import grammar
from noports.atprotocol._dartre import compile_dart, compile_linear, translate_re2

LOOKAROUND_VERBS = {"update_meta", "llookup", "stats", "config", "notify", "otp"}


def test_only_the_lookaround_patterns_backtrack() -> None:
    backtracking = {v for v in grammar.SYNTAX if grammar.engine(v) == "backtracking"}
    assert backtracking == LOOKAROUND_VERBS
    for verb in LOOKAROUND_VERBS:
        assert translate_re2(grammar.SYNTAX[verb]) is None


def test_dart_meaning_survives_the_port() -> None:
    rx = compile_linear(r"^a\s(?<w>\w+)$")
    assert rx.fullmatch("A\u00a0xY_9") is not None  # \s is JavaScript's, case-insensitive
    assert rx.fullmatch("a\u0085x") is None  # NEL is not JavaScript whitespace
    assert rx.fullmatch("a é") is None  # \w stays ASCII, as in Dart
    assert rx.search("a x\n") is None  # $ is the very end of input


def _params(rx, line: str) -> dict[str, str] | None:
    out: dict[str, str] = {}
    found = False
    for m in rx.finditer(line):
        found = True
        for k, v in m.groupdict().items():
            if v is not None and k not in out:
                out[k] = v
    return out if found else None


_LINEAR = {v: compile_linear(p) for v, p in grammar.SYNTAX.items() if v not in LOOKAROUND_VERBS}
_OLD = {v: compile_dart(grammar.SYNTAX[v]) for v in _LINEAR}
_PIECES = ["update:", "lookup:", "plookup:", "scan", "from:", "notify:all:", "notify:list",
           "sync:from:", "monitor", "delete:", "public:", "@alice", "@bob", ":ttl:", "-1", "10",
           ":", "@", ",", " ", "\u00a0", "\t", "\n", "key", ".wavi", "Ä", "x", "{", "}", "json",
           "true", "cached:", "meta:", "all:", "bypassCache:", "page:", "showhidden:", "regex"]


@settings(max_examples=400, derandomize=True, deadline=None)
@given(verb=st.sampled_from(sorted(_LINEAR)),
       parts=st.lists(st.sampled_from(_PIECES), max_size=14))
def test_re2_port_parses_like_the_backtracking_port(verb: str, parts: list[str]) -> None:
    prefix = grammar.SYNTAX[verb][1:].split("(")[0].split("\\")[0].split("|")[0]
    line = grammar.convert_command(prefix + "".join(parts))
    assert _params(_LINEAR[verb], line) == _params(_OLD[verb], line)
