# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Controller-side helpers shared by the ``sshnp`` connection and ``devices`` inventory plugins.

Why here and not in ``module_utils``: nothing in this file runs on a managed node, and
``plugin_utils`` is never shipped inside AnsiballZ payloads. Why no import of the ``noports``
runtime: the connection plugin must load (and ``ansible-doc`` must render) on a controller
whose Python cannot import ``noports`` (e.g. ``sshnp`` installed with pipx); the two small
functions the client and the plugin must agree on are mirrored here, and a unit test checks
they stay identical to ``noports.client.knownhosts``.
"""

from __future__ import annotations

import hashlib
import os
import re

from ansible_collections.noports.sshnp.plugins.module_utils.noports_atsign import (
    InvalidAtSign,
    normalize_atsign,
)

DEFAULT_ROOT_DOMAIN = "root.atsign.org:64"
DEFAULT_DEVICE = "default"

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


class SshnpConfigError(ValueError):
    """A plugin option is missing or malformed; the message names the option."""


def norm_atsign(value: object, what: str) -> str:
    """``'Alice'`` / ``' @alice '`` -> ``'@alice'``: the one atSign rule (module_utils mirror)."""
    try:
        return normalize_atsign(str(value or ""))
    except InvalidAtSign as exc:
        raise SshnpConfigError(f"{what}: {exc}") from None


def host_key_alias(device_atsign: str, device: str) -> str:
    """``alice_device/pi4``: the HostKeyAlias the client writes the pinned host keys under.

    Mirror of ``noports.client.knownhosts.host_key_alias`` (known_hosts patterns must not
    start with ``@`` and treat ``*?!,`` specially, so anything unusual becomes ``_``).
    """
    at = device_atsign.strip().lower().lstrip("@")
    return f"{_SAFE.sub('_', at)}/{_SAFE.sub('_', device)}"


def default_known_hosts_path(alias: str) -> str:
    """Mirror of the client's per-device default, ``~/.atsign/sshnp/known_hosts.d/<alias>``."""
    return os.path.join(os.path.expanduser("~"), ".atsign", "sshnp", "known_hosts.d",
                        alias.replace("/", "__"))


def default_keys_path(client_atsign: str) -> str:
    """``~/.atsign/keys/@alice_key.atKeys`` (the official default)."""
    return os.path.join(os.path.expanduser("~"), ".atsign", "keys",
                        f"{client_atsign}_key.atKeys")


def identity_digest(client_atsign: str, device_atsign: str, device: str,
                    remote_user: str | None = None, port: object = None) -> str:
    """Stable hex digest of one tunnel identity (who asks, which device, as whom).

    The remote user and port are part of it because an OpenSSH master is logged in as one
    user on one sshd: reusing it for another user would silently run as the wrong account.
    """
    text = "\0".join([client_atsign.lower(), device_atsign.lower(), device,
                      remote_user or "", "" if port is None else str(port)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def control_path_name(digest: str) -> str:
    """``np-<12 hex>``: short, because sun_path is 104-108 bytes and OpenSSH appends a
    17-character random suffix while it creates the master socket."""
    return "np-" + digest[:12]


def relay_list(value: object) -> list[str]:
    """Relays from a list or a comma-separated string, normalised, order kept, no repeats."""
    items: list[str] = []
    raw = value if isinstance(value, (list, tuple)) else [value] if value else []
    for item in raw:
        items += [v.strip() for v in str(item).split(",") if v.strip()]
    out: list[str] = []
    for item in items:
        at = norm_atsign(item, "relays")
        if at not in out:
            out.append(at)
    return out
