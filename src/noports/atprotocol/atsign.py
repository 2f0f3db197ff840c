"""The one atSign rule: what an atSign may contain and its canonical form.

Every part of noports (clients, daemons, relay, atServer, atDirectory, the Ansible plugins'
mirror) normalises atSigns with :func:`normalize_atsign`, so an atSign one part accepts is
accepted, and spelt the same, everywhere. The rule is the official one, taken from two places
that a real atSign must satisfy at once:

* ``AtUtils.fixAtSign`` (at_libraries ``at_utils/lib/src/atsign_util.dart``), which every
  official client and the atServer apply: lower-case; prefix ``@`` if missing; exactly one
  ``@``; dots after the ``@`` are dropped (``@colin.constable`` is ``@colinconstable``);
  reserved characters ``!*'`();:&=+$,/?#[]{}``, whitespace and control characters refused;
* the owner part of every key (at_commons ``at_key_regex_utils.dart``,
  ``@(?<owner>([\\w\\-_]|<emoji>){1,55})`` with Dart's ASCII ``\\w``): an atSign outside that
  shape cannot own a single key on an official atServer (not even its public key), so it is
  refused here too. Allowed: ``a-z 0-9 _ -`` and the emoji ranges (U+00A9, U+00AE,
  U+2000-U+3300, U+FE00-U+FE0F, U+1F000-U+1FBFF), 1 to 55 of them.

One convenience on top: surrounding whitespace is ignored (user input, config files).
"""

from __future__ import annotations

import re

MAX_ATSIGN_CHARS = 55  # the owner fragment of the key regexes: {1,55}

_RESERVED = re.compile(r"[!*'`();:&=+$,/?#\[\]{}]")
_WHITESPACE = re.compile("[\u0020\u0009\u000a\u000b\u000c\u000d\u0085\u00a0\u1680"
                         "\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
_CONTROL = re.compile("[\u0000-\u001f\u007f\u2400-\u241f\u2421\u2424\u2425]")
_BODY_CHAR = re.compile("[a-z0-9_\\-\u00a9\u00ae\u2000-\u3300\ufe00-\ufe0f"
                        "\U0001f000-\U0001fbff]")


class InvalidAtSign(ValueError):
    """Not an atSign; ``reason`` says which part of the rule it breaks (one short phrase)."""

    def __init__(self, value: object, reason: str) -> None:
        super().__init__(f"not a valid atSign: {value!r} ({reason})")
        self.value = value
        self.reason = reason


def normalize_atsign(value: object) -> str:
    """``'Alice'``, ``' @alice '``, ``'@Colin.Constable'`` -> ``'@alice'``, ``'@colinconstable'``.

    Raises :class:`InvalidAtSign` (a ValueError) for anything that is not an atSign; never
    anything else, whatever ``value`` is.
    """
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


def is_atsign(value: object) -> bool:
    """True if :func:`normalize_atsign` accepts ``value``."""
    try:
        normalize_atsign(value)
    except InvalidAtSign:
        return False
    return True
