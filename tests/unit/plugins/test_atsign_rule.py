"""The plugins' atSign normalisers are the one rule (module_utils mirror): same corpus
(atsign_corpus.py) as tests/unit/test_atprotocol_atsign.py, fed through each plugin's own wrapper."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from ansible_collections.noports.sshnp.plugins.module_utils import noports_sshnpd
from ansible_collections.noports.sshnp.plugins.modules import atsign_keys
from ansible_collections.noports.sshnp.plugins.plugin_utils import _sshnp_common

_spec = importlib.util.spec_from_file_location(
    "atsign_corpus", Path(__file__).resolve().parent / "atsign_corpus.py")
assert _spec and _spec.loader
_corpus_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_corpus_mod)
CORPUS = _corpus_mod.CORPUS

WRAPPERS = [
    ("atsign_keys", atsign_keys.normalize_atsign, ValueError),
    ("connection/inventory", lambda s: _sshnp_common.norm_atsign(s, "client_atsign"),
     _sshnp_common.SshnpConfigError),
    ("sshnpd_config", noports_sshnpd.normalize_atsign, noports_sshnpd.ConfigValueError),
]


@pytest.mark.parametrize("name, fn, error", WRAPPERS, ids=[w[0] for w in WRAPPERS])
def test_plugin_normalisers_follow_the_one_rule(name, fn, error):
    for value, want in CORPUS:
        if want is None:
            with pytest.raises(error, match="not a valid atSign"):
                fn(value)
        else:
            assert fn(value) == want, (name, value)
