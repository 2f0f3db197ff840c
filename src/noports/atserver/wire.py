"""Parsing of atServer replies as seen by an *outbound* (server-to-server) client.

Why here and pure: the outbound side must cope with TLS record splits and with every prompt
form (`@`, `@alice@`, the bare pol reply `@alice@`), exactly like the Dart server's outbound
listener does (reference §2.3). Keeping it sans-IO makes it testable without sockets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_POL_REPLY = re.compile(r"^@[^@\s:]+@$")


@dataclass(frozen=True)
class RemoteReply:
    """One reply from a remote atServer: either data or an error code + message."""

    data: str | None = None
    code: str | None = None
    message: str = ""
    raw: str = ""

    @property
    def ok(self) -> bool:
        return self.code is None


def reply_complete(buf: str) -> bool:
    """True once `buf` holds one whole reply: `<body>\\n<prompt>` or a bare pol reply."""
    if "\n" in buf:
        tail = buf.rsplit("\n", 1)[1]
        return tail.endswith("@")
    return bool(_POL_REPLY.match(buf.strip()))


def strip_prompt_prefix(text: str) -> str:
    """Drop a stray prompt (e.g. the rest of `@alice@` split off a previous reply)."""
    for marker in ("data:", "error:"):
        i = text.find(marker)
        if i > 0 and ":" not in text[:i]:
            return text[i:]
    return text


def parse_reply(buf: str) -> RemoteReply:
    """Turn one complete reply into data / error (legacy `AT0015-…` or JSON error form)."""
    raw = buf
    if "\n" not in buf:
        return RemoteReply(data=buf.strip(), raw=raw)  # pol reply `@alice@`
    body = strip_prompt_prefix(buf.rsplit("\n", 1)[0].strip())
    if body.startswith("data:"):
        return RemoteReply(data=body[5:].lstrip(" ") if body.startswith("data: ") else body[5:],
                           raw=raw)
    if body.startswith("error:"):
        return parse_error(body[6:], raw)
    return RemoteReply(code="AT0014", message=f"unexpected reply: {body[:200]}", raw=raw)


def parse_error(text: str, raw: str = "") -> RemoteReply:
    text = text.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
            return RemoteReply(code=str(obj.get("errorCode", "AT0011")),
                               message=str(obj.get("errorDescription", "")), raw=raw)
        except ValueError:
            pass
    m = re.match(r"^(AT\d{4})[-:]?(.*)$", text, re.S)
    if m:
        return RemoteReply(code=m.group(1), message=m.group(2).strip(), raw=raw)
    return RemoteReply(code="AT0011", message=text, raw=raw)


def parse_proof(data: str) -> tuple[str, str]:
    """`proof:_<sid>@alice:<uuid>` → (`_<sid>@alice`, `<uuid>`) (reference §6.3)."""
    parts = data.split(":")
    if len(parts) != 3 or parts[0] != "proof":
        raise ValueError(f"not a from-proof: {data[:100]}")
    return parts[1], parts[2]
