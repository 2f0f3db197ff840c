# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The one atSign rule, mirrored for the plugins (which must not import the noports runtime).

Mirror of ``noports.atprotocol.atsign.normalize_atsign`` (read that docstring for where the
rule comes from: the official ``AtUtils.fixAtSign`` plus the owner shape of the key regexes).
tests/unit/test_atprotocol_atsign.py feeds one corpus to both and to every wrapper, so the two
cannot drift apart.
"""

from __future__ import annotations

import re

MAX_ATSIGN_CHARS = 55

_RESERVED = re.compile(r"[!*'`();:&=+$,/?#\[\]{}]")
_WHITESPACE = re.compile("[\u0020\u0009\u000a\u000b\u000c\u000d\u0085\u00a0\u1680"
                         "\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
_CONTROL = re.compile("[\u0000-\u001f\u007f\u2400-\u241f\u2421\u2424\u2425]")
_BODY_CHAR = re.compile("[a-z0-9_\\-\u00a9\u00ae\u2000-\u3300\ufe00-\ufe0f"
                        "\U0001f000-\U0001fbff]")


class InvalidAtSign(ValueError):
    """Not an atSign; ``reason`` says which part of the rule it breaks."""

    def __init__(self, value, reason):
        super().__init__(f"not a valid atSign: {value!r} ({reason})")
        self.value = value
        self.reason = reason


def normalize_atsign(value):
    """``'Alice'`` / ``' @alice '`` -> ``'@alice'``; raises InvalidAtSign (a ValueError) only."""
    if not isinstance(value, str):
        raise InvalidAtSign(value, f"must be text, not {type(value).__name__}")
    text = value.strip().lower()
    if text.startswith("@"):
        text = text[1:]
    if "@" in text:
        raise InvalidAtSign(value, "more than one '@'")
    text = text.replace(".", "")
    if not text:
        raise InvalidAtSign(value, "empty")
    for pattern, reason in ((_RESERVED, "reserved character"), (_WHITESPACE, "whitespace"),
                            (_CONTROL, "control character")):
        m = pattern.search(text)
        if m:
            raise InvalidAtSign(value, f"{reason} {m.group()!r}")
    if len(text) > MAX_ATSIGN_CHARS:
        raise InvalidAtSign(value, f"longer than {MAX_ATSIGN_CHARS} characters")
    bad = sorted({ch for ch in text if not _BODY_CHAR.fullmatch(ch)})
    if bad:
        raise InvalidAtSign(value, "only a-z, 0-9, '_', '-' and emoji are allowed, not "
                            + " ".join(repr(ch) for ch in bad[:5]))
    return "@" + text
