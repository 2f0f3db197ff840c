"""The one atSign rule: its cases (from AtUtils.fixAtSign and the key regexes), a contract that
every normaliser in the runtime and the plugins' mirror agree on one corpus, and properties."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noports.atclient import connection, e2e
from noports.atprotocol import keys as server_keys
from noports.atprotocol.atsign import InvalidAtSign, is_atsign, normalize_atsign
from noports.atserver import admin as atserver_admin
from noports.client import params
from noports.directory import store as directory_store
from noports.keys import atkeys
from noports.npproto import keys as npkeys

ROOT = Path(__file__).resolve().parents[2]


def _load_mirror():
    path = ROOT / "plugins" / "module_utils" / "noports_atsign.py"
    spec = importlib.util.spec_from_file_location("noports_atsign_mirror", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MIRROR = _load_mirror()

def _load_corpus() -> list[tuple[str, str | None]]:
    path = ROOT / "tests" / "unit" / "plugins" / "atsign_corpus.py"
    spec = importlib.util.spec_from_file_location("atsign_corpus", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CORPUS


CORPUS = _load_corpus()


@pytest.mark.parametrize("value, want", CORPUS)
def test_the_rule(value, want):
    if want is None:
        with pytest.raises(InvalidAtSign):
            normalize_atsign(value)
        assert not is_atsign(value)
    else:
        assert normalize_atsign(value) == want


def test_the_reason_names_the_broken_part():
    with pytest.raises(InvalidAtSign, match=r"reserved character '/'"):
        normalize_atsign("@a/b")
    with pytest.raises(InvalidAtSign, match="longer than 55"):
        normalize_atsign("x" * 56)
    with pytest.raises(InvalidAtSign, match="more than one '@'"):
        normalize_atsign("a@b")
    with pytest.raises(InvalidAtSign, match="must be text"):
        normalize_atsign(None)


def _wrappers():
    """Every normaliser of the runtime: (name, function, its error type, output -> canonical)."""
    same = lambda s: s  # noqa: E731
    return [
        ("plugins mirror", MIRROR.normalize_atsign, ValueError, same),
        ("atserver fix_atsign", server_keys.fix_atsign, server_keys.AtError, same),
        ("atclient e2e", e2e.fix_atsign, e2e.E2EError, same),
        ("atclient connection", connection._at, ValueError, same),
        ("sshnp CLI", lambda s: params.norm_atsign(s, "--to"), params.UsageError, same),
        ("atKeys", atkeys.normalise_atsign, atkeys.AtKeysError, same),
        ("npproto/srvd/sshnpd", npkeys.normalize_atsign, npkeys.ProtocolError, same),
        ("atserver admin", atserver_admin.normalize_atsign, atserver_admin.AdminError, same),
        ("atdirectory", directory_store.normalise_atsign, directory_store.InvalidAtSignError,
         lambda s: "@" + s),
    ]


@pytest.mark.parametrize("name, fn, error, canon", _wrappers(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_every_normaliser_agrees_on_the_corpus(name, fn, error, canon):
    """One corpus fed to every implementation (the plugins' mirror included)."""
    for value, want in CORPUS:
        if want is None:
            with pytest.raises(error):
                fn(value)
        else:
            assert canon(fn(value)) == want, (name, value)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.text(max_size=70))
def test_property_mirror_matches_and_only_invalid_atsign_is_raised(text):
    try:
        got = normalize_atsign(text)
    except InvalidAtSign:
        with pytest.raises(ValueError):
            MIRROR.normalize_atsign(text)
        return
    assert MIRROR.normalize_atsign(text) == got
    assert normalize_atsign(got) == got  # canonical form is a fixed point
    assert got.startswith("@") and got.count("@") == 1 and 2 <= len(got) <= 56
