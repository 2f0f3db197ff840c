"""Command grammar: dispatch a request line to a verb and extract its parameters.

Ports at_commons ``VerbSyntax`` and the at_server dispatch rules (docs/reference/atprotocol.md#command-dispatch, docs/reference/atprotocol.md#verbs):
the verb part is normalised with ``convertCommand``, the first handler whose ``accept()``
matches wins (order matters: ``update:meta`` before ``update``, ``notify:list`` before
``notify``), and named groups of *all* regex matches are merged put-if-absent, exactly like
``AbstractVerbHandler.parse``. Only :class:`~noports.atprotocol.errors.AtError` escapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import regex

from ._dartre import compile_dart, compile_linear
from .errors import AtError, invalid_syntax
from .metadata import UPDATE_PARAMS

# Upper bound for one backtracking regex evaluation (the few verbs RE2 cannot take); the match
# releases the GIL, so a server that parses long lines off its event loop keeps serving.
_REGEX_TIMEOUT_S = 2.0

# --- VerbSyntax (at_commons 5.0.1 as quoted by the reference) ---------------------------

_META_VALUE = {"int": r"(-?)\d+", "bool": r"true|false", "str": r"[^:@\s]+"}
META = "".join(f"(:{w}:(?<{w}>{_META_VALUE[kind]}))?" for w, _attr, kind in UPDATE_PARAMS)

SYNTAX: dict[str, str] = {
    "from": r"^from:(?<atSign>@?[^:@\s]+)(:clientConfig:(?<clientConfig>\{.+\}))?$",
    "cram": r"^cram:(?<digest>.+$)",
    "pkam": (
        r"^pkam:(signingAlgo:(?<signingAlgo>ecc_secp256r1|rsa2048):)?"
        r"(hashingAlgo:(?<hashingAlgo>sha256|sha512):)?"
        r"(enrollmentId:(?<enrollmentId>.+):)?(?<signature>.+$)"
    ),
    "pol": r"^pol$",
    "update": (
        r"^update:json:(?<json>.+)$"
        r"|"
        r"^update" + META + r"(:((?<publicScope>public)|(@(?<forAtSign>[^:@\s]+))))?"
        r":(?<atKey>(([^:@\s]+)|(privatekey:at_pkam_publickey)))"
        r"(@(?<atSign>[^:@\s]+))?"
        r" (?<value>.+)$"
    ),
    "update_meta": (
        r"^update:meta(:((?<publicScope>public)|(@(?<forAtSign>[^:@\s]+))))?"
        r":(?<atKey>[^:@]((?!:{2})[^:@])+)@(?<atSign>[^:@\s]+)" + META + r"$"
    ),
    "llookup": (
        r"^llookup(:(?<operation>meta|all))?(:cached)?"
        r"(:((?<publicScope>public)|(@(?<forAtSign>[^:@\s]+))))?"
        r":(?<atKey>[^:]((?!:{2})[^@])+)@(?<atSign>[^:@\s]+)$"
    ),
    "plookup": (
        r"^plookup:(bypassCache:(?<bypassCache>true|false):)?((?<operation>meta|all):)?"
        r"(?<atKey>[^@\s]+)@(?<atSign>[^:@\s]+)$"
    ),
    "lookup": (
        r"^lookup:(bypassCache:(?<bypassCache>true|false):)?((?<operation>meta|all):)?"
        r"(?<atKey>(?:[^:]).+)@(?<atSign>[^:@\s]+)$"
    ),
    "scan": (
        r"^scan$|scan(:showhidden:(?<showhidden>true|false))?(:(?<forAtSign>@[^:@\s]+))?"
        r"(:page:(?<page>\d+))?( (?<regex>\S+))?$"
    ),
    "delete": (
        r"^delete(:priority:(?<priority>low|medium|high))?(:cached)?"
        r"(:((?<publicScope>public)|(@(?<forAtSign>[^:@\s]+))))?"
        r":(?<atKey>(([^:@\s]+)|(privatekey:at_secret)))(@(?<atSign>[^:@\s]+))?$"
    ),
    "stats": r"^stats(?<statId>:((?!0)\d+)?(,(\d+))*)?(:(?<regex>(?<=:3:|:15:).+))?$",
    "config": (
        r"^config:(?:(?<=config:)block:(?<operation>add|remove|show)"
        r"(?:(?<=show)\s?$|(?:(?<=add|remove):(?<atSign>(?:@[^:@\s]+)( (?:@[^\s@]+))*$))))"
        r"|(?:(?<=config:)(?<setOperation>set|reset|print):(?<configNew>.+)$)"
    ),
    # NOTE: `selfNotifications` is a plain flag group as in the reference (docs/reference/atprotocol.md#notification-verbs).
    "monitor": (
        r"^monitor(:(?<strict>strict))?(:(?<selfNotifications>selfNotifications))?"
        r"(:(?<multiplexed>multiplexed))?(:(?<epochMillis>\d+))?( (?<regex>.+))?$"
    ),
    "notify": (
        r"^notify(:id:(?<id>[\w\d\-\_]+))?(:(?<operation>update|delete))?"
        r"(:messageType:(?<messageType>key|text))?(:priority:(?<priority>low|medium|high))?"
        r"(:strategy:(?<strategy>all|latest))?(:latestN:(?<latestN>\d+))?"
        r"(:notifier:(?<notifier>[^\s:]+))?(:ttln:(?<ttln>\d+))?"
        + META
        + r":((?<publicScope>public)|(@(?<forAtSign>[^:@\s]+)))"
        r":(?<atKey>[^:@]((?!:{2})[^@])+)(@(?<atSign>[^:@\s]+))?(:(?<value>.+))?$"
    ),
    "notify_list": (
        r"^notify:list(:(?<fromDate>\d{4}-[01]?\d?-[0123]?\d?))?"
        r"(:(?<toDate>\d{4}-[01]?\d?-[0123]?\d?))?(:(?<regex>[^:]+))?"
    ),
    "notify_status": r"^notify:status:(?<notificationId>\S+)$",
    "notify_fetch": r"^notify:fetch:(?<notificationId>\S+)$",
    "notify_remove": r"notify:remove:(?<id>[\w\d\-\_]+)",
    "notify_all": (
        r"^notify:all:((?<operation>update|delete):)?(messageType:((?<messageType>key|text):))?"
        r"(?:ttl:(?<ttl>\d+):)?(?:ttb:(?<ttb>\d+):)?(?:ttr:(?<ttr>-?\d+):)?"
        r"(?:ccd:(?<ccd>true|false+):)?(?<forAtSign>(([^:\s])+)?(,([^:\s]+))*)"
        r"(:(?<atKey>[^@:\s]+))(@(?<atSign>[^@:\s]+))?(:(?<value>.+))?$"
    ),
    "sync": r"^sync:from:(?<from_commit_seq>[0-9]+|-1)(:limit:(?<limit>\d+))(:(?<regex>.+))?$",
    "batch": r"^batch:(?<json>.+)$",
    # Deviation: `brief` is a named group here (Dart checks the raw command instead).
    "info": r"^info(:(?<brief>brief))?$",
    "noop": r"^noop:(?<delayMillis>\d+)$",
    "enroll": (
        r"^enroll:(?<operation>(?:(request|approve|deny|revoke|list|fetch|unrevoke|delete)))"
        r"(:(?<force>force))?(?::)?((?<enrollParams>.+)|(<=list:)<enrollParams>.?)?$"
    ),
    "otp": r"^otp:(?<operation>get|put)(:(?<otp>(?<=put:)\w{6,}))?(:(?:ttl:(?<ttl>\d+)))?$",
    "keys": (
        r"^keys:(?<operation>put|get|delete):(((?<visibility>public|private|self)(:)?)?)"
        r"(keyName:(?<keyName>[a-zA-Z0-9_]+)(:)?)?"
        r"((namespace:(?<namespace>[a-zA-Z0-9_]+):)?)"
        r"((appName:(?<appName>[a-zA-Z0-9_]+):)?)"
        r"((deviceName:(?<deviceName>[a-zA-Z0-9_]+):)?)"
        r"(((keyType:(?<keyType>[a-zA-Z0-9_-]+)):)?)"
        r"((encryptionKeyName:(?<encryptionKeyName>[a-zA-Z0-9_]+):)?)?"
        r"((?<keyValue>.*))?$"
    ),
}

USAGE: dict[str, str] = {
    "from": "from:@<atsign>[:clientConfig:{json}]",
    "cram": "cram:<digest>",
    "pkam": "pkam:[signingAlgo:<algo>:][hashingAlgo:<algo>:][enrollmentId:<id>:]<signature>",
    "pol": "pol",
    "update": "update:[<metadata>:][public:|@<sharedWith>:]<key>@<atsign> <value>",
    "update_meta": "update:meta:[public:|@<sharedWith>:]<key>@<atsign>[:<metadata>]",
    "llookup": "llookup:[meta:|all:][cached:][public:|@<sharedWith>:]<key>@<atsign>",
    "plookup": "plookup:[bypassCache:true|false:][meta:|all:]<key>@<atsign>",
    "lookup": "lookup:[bypassCache:true|false:][meta:|all:]<key>@<atsign>",
    "scan": "scan[:showHidden:true|false][:@<atsign>][:page:<n>][ <regex>]",
    "delete": "delete:[public:|@<sharedWith>:]<key>@<atsign>",
    "stats": "stats[:<id>[,<id>]*][:<regex>]",
    "config": "config:block:add|remove|show[:@<atsign> ...]",
    "monitor": "monitor[:selfNotifications][:<epochMillis>][ <regex>]",
    "notify": "notify:[id:<id>:][update|delete:][messageType:key|text:]...:@<to>:<key>[@<from>][:<value>]",
    "notify_list": "notify:list[:<fromDate>][:<toDate>][:<regex>]",
    "notify_status": "notify:status:<id>",
    "notify_fetch": "notify:fetch:<id>",
    "notify_remove": "notify:remove:<id>",
    "notify_all": "notify:all:[update|delete:]@<to>[,@<to>]*:<key>[@<from>][:<value>]",
    "sync": "sync:from:<commitId>:limit:<n>[:<regex>]",
    "batch": "batch:<json>",
    "info": "info[:brief]",
    "noop": "noop:<delayMillis>",
    "enroll": "enroll:<operation>:<json>",
    "otp": "otp:get|put[:<otp>][:ttl:<ms>]",
    "keys": "keys:put|get|delete:...",
}

# RE2 (linear in the line) wherever it can say the Dart pattern; the backtracking engine, with a
# time budget, only for the six verbs whose official patterns use lookaround.
_LINEAR: dict[str, Any] = {}
_BACKTRACKING: dict[str, regex.Pattern] = {}
for _verb, _pattern in SYNTAX.items():
    _rx = compile_linear(_pattern)
    if _rx is not None:
        _LINEAR[_verb] = _rx
    else:
        _BACKTRACKING[_verb] = compile_dart(_pattern)


def engine(verb: str) -> str:
    """Which engine parses ``verb``: "re2" (linear time) or "backtracking" (time-boxed)."""
    return "re2" if verb in _LINEAR else "backtracking"


def _finditer(verb: str, command: str) -> Iterator[Any]:
    linear = _LINEAR.get(verb)
    if linear is not None:
        return linear.finditer(command)
    return _BACKTRACKING[verb].finditer(command, timeout=_REGEX_TIMEOUT_S, concurrent=True)


def _not_notify_sub(c: str) -> bool:
    return c.startswith("notify:") and not c.startswith(
        ("notify:list", "notify:status", "notify:all", "notify:remove", "notify:fetch")
    )


# Handler order of at_server's VerbHandlerManager (docs/reference/atprotocol.md#command-dispatch step 3); `stream` is not
# implemented and therefore answers "invalid command".
_HANDLERS: list[tuple[str, Callable[[str], bool]]] = [
    ("from", lambda c: c.startswith("from:")),
    ("cram", lambda c: c.startswith("cram:")),
    ("pkam", lambda c: c.startswith("pkam:")),
    ("update", lambda c: c.startswith("update:") and not c.startswith("update:meta")),
    ("update_meta", lambda c: c.startswith("update:meta")),
    ("llookup", lambda c: c.startswith("llookup:")),
    ("plookup", lambda c: c.startswith("plookup:")),
    ("lookup", lambda c: c.startswith("lookup:")),
    ("scan", lambda c: c.startswith("scan")),
    ("pol", lambda c: c == "pol"),
    ("delete", lambda c: c.startswith("delete:")),
    ("stats", lambda c: c.startswith("stats")),
    ("config", lambda c: c.startswith("config:")),
    ("monitor", lambda c: c.startswith("monitor")),
    ("notify", _not_notify_sub),
    ("notify_list", lambda c: c.startswith("notify:list")),
    ("batch", lambda c: c.startswith("batch:")),
    ("notify_status", lambda c: c.startswith("notify:status")),
    ("notify_all", lambda c: c.startswith("notify:all")),
    ("sync", lambda c: c.startswith("sync:from")),
    ("info", lambda c: c == "info" or c.startswith("info:")),
    ("noop", lambda c: c.startswith("noop:")),
    ("notify_remove", lambda c: c.startswith("notify:remove")),
    ("notify_fetch", lambda c: c.startswith("notify:fetch")),
    ("enroll", lambda c: c.startswith("enroll:")),
    ("otp", lambda c: c.startswith("otp:")),
    ("keys", lambda c: c.startswith("keys:")),
]

VERBS: tuple[str, ...] = (*(v for v, _handler in _HANDLERS), "update_json", "exit")


@dataclass(frozen=True)
class Command:
    """A parsed request: verb id, named regex groups that matched, and the normalised line."""

    verb: str
    params: dict[str, str]
    raw: str


def convert_command(line: str) -> str:
    """Port of ``SecondaryUtil.convertCommand``: normalise the verb part only.

    Keys and values keep their case; the keystore lower-cases keys later.
    """
    index = line.find(":")
    if index == -1:
        return line.lower()
    return line[:index].lower().replace(" ", "") + line[index:]


def match_params(verb: str, command: str) -> dict[str, str] | None:
    """Named groups of all matches of ``verb``'s regex, put-if-absent; None if no match."""
    params: dict[str, str] = {}
    found = False
    try:
        for m in _finditer(verb, command):
            found = True
            for name, value in m.groupdict().items():
                if value is not None and name not in params:
                    params[name] = value
    except (TimeoutError, UnicodeEncodeError):  # budget spent; a lone surrogate is no UTF-8
        raise invalid_syntax(f"Invalid syntax. {USAGE[verb]}") from None
    return params if found else None


def parse_command(line: str) -> Command:
    """Parse one request line into a :class:`Command` or raise ``AtError`` (AT0003)."""
    try:
        return _parse(line)
    except AtError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract is "only AtError escapes"
        raise invalid_syntax(f"Invalid syntax. {type(exc).__name__}") from exc


def _parse(line: str) -> Command:
    if not isinstance(line, str):
        raise invalid_syntax("invalid command")
    command = convert_command(line.strip())
    if command == "@exit":
        return Command("exit", {}, command)
    verb = next((v for v, accept in _HANDLERS if accept(command)), None)
    if verb is None:
        raise invalid_syntax("invalid command")
    params = match_params(verb, command)
    if params is None:
        raise invalid_syntax(f"Invalid syntax. {USAGE[verb]}")
    if verb == "update" and "json" in params:
        verb = "update_json"
    elif verb in ("llookup", "delete"):
        # Dart's handlers add these flags by substring test (`cached` is not a named group).
        if "public:" in command:
            params.setdefault("isPublic", "true")
        if "cached:" in command:
            params.setdefault("isCached", "true")
    elif (
        verb == "notify"
        and params.get("strategy", "").lower() == "latest"
        and "notifier" not in params
    ):
        raise invalid_syntax("For Strategy latest, notifier cannot be null")
    return Command(verb, params, command)
