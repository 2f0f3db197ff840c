"""The OpenSSH command line that runs through the tunnel (exec mode and ``-x``).

Why pinned options: the host key comes from the device's signed response, written under a
``HostKeyAlias`` naming the device (not the random local port), so ``StrictHostKeyChecking=yes``
can hold. Without pinned keys (an official daemon) we fall back to the official client's
``accept-new`` under the same alias, in the user's own known_hosts.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

LOCALHOST = "127.0.0.1"


def ssh_command(*, ssh_binary: str, port: int, user: str | None, alias: str,
                known_hosts: Path | None, identity_file: Path | None = None,
                ssh_options: Sequence[str] = (), command: Sequence[str] = ()) -> list[str]:
    argv = [ssh_binary, "-p", str(port), "-o", f"HostKeyAlias={alias}"]
    if known_hosts is not None:
        argv += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes"]
    else:
        argv += ["-o", "StrictHostKeyChecking=accept-new"]
    argv += ["-o", "CheckHostIP=no"]
    if identity_file is not None:
        argv += ["-i", str(identity_file), "-o", "IdentitiesOnly=yes"]
    for opt in ssh_options:
        argv += ["-o", opt]
    argv.append(f"{user}@{LOCALHOST}" if user else LOCALHOST)
    if command:
        argv += ["--", *command]
    return argv


def printable(argv: Sequence[str]) -> str:
    return shlex.join(argv)
