# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""sshnpd's config file: render it from module options, parse it back for comparison.

The format is the daemon's ``key = value`` format (src/noports/daemon/config.py,
``parse_config_text``): canonical long-flag names with ``_``, lists comma-separated, booleans
``true``/``false``, ``#`` comment lines, one optional pair of quotes around a value. Only
settings the user set are written, so the daemon's own defaults apply to the rest and a new
daemon default is picked up without a config change.

Kept free of the ``noports`` runtime (which may not be importable where the module runs) but
faithful to its parser; a unit test renders with this module and parses with the daemon's.
"""

from __future__ import annotations

import re

from ansible_collections.noports.sshnp.plugins.module_utils.noports_atsign import (
    InvalidAtSign,
)
from ansible_collections.noports.sshnp.plugins.module_utils.noports_atsign import (
    normalize_atsign as _normalize_atsign,
)

# canonical setting -> kind, in the order they are written (mirrors daemon.config.SETTINGS)
SETTINGS = (
    ("atsign", "str"),
    ("managers", "list"),
    ("device", "str"),
    ("key_file", "str"),
    ("root_domain", "str"),
    ("ca_file", "str"),
    ("local_sshd_port", "int"),
    ("permit_open", "list"),
    ("authorized_keys", "str"),
    ("sshd_host_keys", "str"),
    ("sshpublickey", "bool"),
    ("sshpublickey_permissions", "str"),
    ("ephemeral_permissions", "str"),
    ("ssh_algorithm", "str"),
    ("hide", "bool"),
    ("device_group", "str"),
    ("ephemeral_key_ttl", "float"),
    ("max_sessions", "int"),
    ("request_window", "float"),
    ("any_client_timezone", "bool"),
    ("storage_path", "str"),
    ("log_format", "str"),
    ("verbose", "bool"),
)
SETTING_NAMES = tuple(name for name, _kind in SETTINGS)

_DEVICE_RE = re.compile(r"[a-z0-9_][a-z0-9_\-]{1,35}")
_PERMIT_RE = re.compile(r"(\*|[A-Za-z0-9._\-]+|\[[0-9A-Fa-f:.]+\]):(\*|\d{1,5})")


class ConfigValueError(ValueError):
    """A setting the daemon would refuse; the message names it."""


def normalize_atsign(value, setting="atsign"):
    try:
        return _normalize_atsign(value or "")
    except InvalidAtSign as exc:
        raise ConfigValueError(f"{setting}: {exc}") from None


def snakify_device(value):
    """The daemon's device-name rule: lower-case, whitespace -> '_', then the official regex."""
    name = re.sub(r"\s+", "_", (value or "").strip().lower())
    if not _DEVICE_RE.fullmatch(name):
        raise ConfigValueError(
            f"device: {value!r} is not a valid device name (2-36 of a-z 0-9 _ -, not starting with -)")
    return name


def validate(settings):
    """Normalise and check the settings the daemon validates most often; returns a new dict."""
    out = dict(settings)
    out["atsign"] = normalize_atsign(out.get("atsign"))
    managers = []
    for item in out.get("managers") or []:
        for m in str(item).split(","):
            if m.strip():
                norm = normalize_atsign(m, "managers")
                if norm not in managers:
                    managers.append(norm)
    if not managers:
        raise ConfigValueError("managers: at least one client atSign is required")
    out["managers"] = managers
    if out.get("device") is not None:
        out["device"] = snakify_device(out["device"])
    if out.get("permit_open") is not None:
        items = []
        for raw in out["permit_open"]:
            for item in str(raw).split(","):
                item = item.strip()
                if not item:
                    continue
                m = _PERMIT_RE.fullmatch(item)
                if not m or (m.group(2) != "*" and not 0 < int(m.group(2)) < 65536):
                    raise ConfigValueError(f"permit_open: expected host:port, got {item!r}")
                if item not in items:
                    items.append(item)
        if not items:
            raise ConfigValueError("permit_open: at least one host:port is needed")
        out["permit_open"] = items
    port = out.get("local_sshd_port")
    if port is not None and not 0 < int(port) < 65536:
        raise ConfigValueError(f"local_sshd_port: out of range: {port}")
    for name in ("ephemeral_permissions", "sshpublickey_permissions"):
        if "\n" in str(out.get(name) or "") or "\r" in str(out.get(name) or ""):
            raise ConfigValueError(f"{name}: must not contain newlines")
    window = out.get("request_window")
    if window is not None and not 1 <= float(window) <= 3600:
        raise ConfigValueError(f"request_window: expected 1 <= seconds <= 3600, got {window}")
    if out.get("root_domain") is not None and not str(out["root_domain"]).strip():
        raise ConfigValueError("root_domain: empty")
    return out


def _scalar(kind, value):
    if kind == "bool":
        return "true" if value else "false"
    if kind == "list":
        return ",".join(str(v) for v in value)
    if kind == "float":
        return repr(float(value))
    return str(value)


def _quote(text):
    """Quote a value the daemon's parser would otherwise trim or unquote."""
    if text == "" or text != text.strip() or text[0] in "\"'" or text[-1] in "\"'":
        return f'"{text}"'
    return text


def render(settings, header=None):
    """The config file text for ``settings`` (canonical names; None values are left out)."""
    lines = []
    for line in (header or "").splitlines():
        lines.append(("# " + line).rstrip())
    for name, kind in SETTINGS:
        value = settings.get(name)
        if value is None:
            continue
        text = _scalar(kind, value)
        if "\n" in text or "\r" in text:
            raise ConfigValueError(f"{name}: must not contain newlines")
        lines.append(f"{name} = {_quote(text)}")
    return "\n".join(lines) + "\n"


def parse(text):
    """Parse ``key = value`` text into {name: str} (values as text, quotes removed)."""
    out = {}
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith(("#", ";")):
            continue
        key, sep, value = s.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key.strip().lower().replace("-", "_")] = value
    return out
