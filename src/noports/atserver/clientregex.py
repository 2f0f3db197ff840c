"""Regexes supplied by clients (scan, monitor, notify:list, sync).

Why one place: every verb that filters with a client pattern compiles and runs it the same
way, so how patterns are bounded is decided once.
"""

from __future__ import annotations

import re
from typing import Any

from noports.atprotocol.errors import illegal_argument


def compile_client(text: str) -> Any:
    try:
        return re.compile(text)
    except re.error as exc:
        raise illegal_argument(f"invalid regex {text!r}: {exc}") from exc


def search(rx: Any, text: str) -> bool:
    try:
        return rx.search(text) is not None
    except (RecursionError, re.error):
        return False
