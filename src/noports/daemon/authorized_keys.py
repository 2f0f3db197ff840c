"""The one place that rewrites the daemon user's ``authorized_keys`` (docs/reference/noports-protocol.md#ephemeral-key-and-authorized_keys).

Why so careful: this file is what lets anyone log in to the device. A torn write locks the
operator out; a lost line from a concurrent writer silently drops someone's key; an ephemeral
key that is never removed is a standing credential. So every change is:

* serialised by ``flock`` on the file's directory (threads *and* processes; the directory is
  locked rather than the file because the file itself is replaced on every write);
* read-modify-write of the whole file, written to a temp file in the same directory, fsynced
  and ``rename``d over the original (readers such as sshd see the old or the new file, never
  half of one);
* mode 0600 for a new file, the original's owner and permission bits (never group/world
  writable) for an existing one, so sshd's ``StrictModes`` keeps accepting it;
* lines we did not write are kept byte for byte, in order.

Ephemeral lines carry the official comment ``sshnp_ephemeral_<sessionId>`` (so leftovers from
either daemon are recognised) followed by ours: ``until=<unix time>`` and
``owner=<@atsign>/<device>``, and ``holder=<pid>`` of the session host that wrote the line
(docs/decisions/0024-sessions-outlive-daemon.md). Several daemons (device names) may share one
authorized_keys: at start-up a daemon removes its own leftovers, untagged (official) ones and
expired ones, but not another live daemon's keys of the last few seconds, nor the keys of its
own sessions that outlived the previous daemon (their holder is alive and removes them).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from noports.npproto.keys import validate_session_id
from noports.npproto.messages import is_openssh_public_key_line

log = logging.getLogger(__name__)

EPHEMERAL_TAG = "sshnp_ephemeral_"
#: the official daemon's forced command for ephemeral keys (keeps a shell from ever starting)
EPHEMERAL_COMMAND = 'command="echo \\"ssh session complete\\";sleep 20"'
#: ours on top of the official options: nothing but the direct-tcpip channel that the client's
#: outer SSH (``ssh`` tunnel mode) needs, which PermitOpen then pins to the local sshd.
EPHEMERAL_RESTRICTIONS = ("no-agent-forwarding", "no-X11-forwarding", "no-pty", "no-user-rc")
#: key types the official daemon accepts from ``sshpublickey`` (prefix match).
ACCEPTED_KEY_PREFIXES = ("ecdsa-sha2-nistp", "rsa-sha2-", "ssh-rsa", "ssh-ed25519")

_OPTION_SAFE = re.compile(r"[\x20-\x7e]*")
_OWNER_RE = re.compile(r"@[^\s:@/]+/[a-z0-9_\-]+")


class AuthorizedKeysError(ValueError):
    """A line we were asked to add is unacceptable; the message says why (never the key)."""


def ephemeral_comment(session_id: str) -> str:
    return EPHEMERAL_TAG + validate_session_id(session_id)


def ephemeral_options(local_sshd_port: int, extra: str = "") -> str:
    """``command=...,PermitOpen="localhost:<port>",no-...[,extra]`` for an ephemeral key."""
    if not 0 < int(local_sshd_port) < 65536:
        raise AuthorizedKeysError(f"bad local sshd port {local_sshd_port}")
    opts = [EPHEMERAL_COMMAND, f'PermitOpen="localhost:{int(local_sshd_port)}"',
            *EPHEMERAL_RESTRICTIONS]
    extra = extra.strip().strip(",")
    if extra:
        if not _OPTION_SAFE.fullmatch(extra):
            raise AuthorizedKeysError("ephemeral permissions must be one printable line")
        opts.append(extra)
    return ",".join(opts)


def ephemeral_line(public_key: str, session_id: str, local_sshd_port: int,
                   extra_options: str = "", *, owner: str | None = None,
                   until: int | None = None, holder: int | None = None) -> str:
    """The full authorized_keys line for one session's ephemeral public key."""
    key = _bare_key(public_key)
    line = f"{ephemeral_options(local_sshd_port, extra_options)} {key} {ephemeral_comment(session_id)}"
    if until is not None:
        line += f" until={int(until)}"
    if owner is not None:
        if not _OWNER_RE.fullmatch(owner):
            raise AuthorizedKeysError(f"bad owner tag {owner!r}")
        line += f" owner={owner}"
    if holder is not None:
        line += f" holder={int(holder)}"
    return line


def _bare_key(public_key: str) -> str:
    """``<type> <base64>`` of an OpenSSH public key line (comment dropped), validated."""
    parts = public_key.strip().split()
    if len(parts) < 2 or not is_openssh_public_key_line(f"{parts[0]} {parts[1]}"):
        raise AuthorizedKeysError("not an OpenSSH public key line")
    return f"{parts[0]} {parts[1]}"


def validate_client_public_key(line: str) -> str:
    """Check a ``sshpublickey`` (K7) value; return it stripped, or raise AuthorizedKeysError.

    A single printable line ``<type> <base64> [comment]``, an accepted type, and a blob that
    really is a key of that type: anything else (options, newlines, junk) could smuggle
    authorized_keys options in.
    """
    if not isinstance(line, str):
        raise AuthorizedKeysError("public key is not a string")
    text = line.strip()
    if "\n" in text or "\r" in text or not _OPTION_SAFE.fullmatch(text):
        raise AuthorizedKeysError("public key must be one printable line")
    if not text.startswith(ACCEPTED_KEY_PREFIXES):
        raise AuthorizedKeysError("public key type is not accepted "
                                  f"(want one of {', '.join(ACCEPTED_KEY_PREFIXES)})")
    if not is_openssh_public_key_line(text):
        raise AuthorizedKeysError("public key is malformed (type and blob do not match)")
    return text


def _key_blob(line: str) -> str | None:
    """The base64 blob of an authorized_keys line (after any options), for duplicate checks."""
    for token in _tokens(line):
        if re.fullmatch(r"AAAA[A-Za-z0-9+/]+={0,2}", token):
            return token
    return None


def _tokens(line: str) -> list[str]:
    """Split on whitespace outside double quotes (options may contain quoted spaces)."""
    out, cur, quoted, esc = [], [], False, False
    for ch in line:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            cur.append(ch)
            esc = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch.isspace() and not quoted:
            if cur:
                out.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


@dataclass(frozen=True)
class EphemeralTag:
    """What the comment of an ephemeral line says (owner/until absent on official lines)."""

    session_id: str
    owner: str | None = None
    until: int | None = None
    holder: int | None = None  # pid of the session host that removes the line itself


def _ephemeral_tag(line: str) -> EphemeralTag | None:
    """Parse the comment after the key blob: ``sshnp_ephemeral_<sid> [until=N] [owner=X]``."""
    toks = _tokens(line)
    for i, tok in enumerate(toks):
        if re.fullmatch(r"AAAA[A-Za-z0-9+/]+={0,2}", tok):
            comment = toks[i + 1:]
            break
    else:
        return None
    if not comment or not comment[0].startswith(EPHEMERAL_TAG):
        return None
    owner = until = holder = None
    for tok in comment[1:]:
        if tok.startswith("owner="):
            owner = tok[len("owner="):]
        elif tok.startswith("until=") and tok[len("until="):].isdigit():
            until = int(tok[len("until="):])
        elif tok.startswith("holder=") and tok[len("holder="):].isdigit():
            holder = int(tok[len("holder="):])
    return EphemeralTag(comment[0][len(EPHEMERAL_TAG):], owner, until, holder)


def _ephemeral_sid(line: str) -> str | None:
    tag = _ephemeral_tag(line)
    return tag.session_id if tag else None


class AuthorizedKeys:
    """Locked, atomic edits of one authorized_keys file (safe across threads and processes)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.expanduser(os.fspath(path)))

    # -- low level -------------------------------------------------------------------------

    def _real(self) -> Path:
        """Follow a symlinked authorized_keys so we replace its target, not the link."""
        return Path(os.path.realpath(self.path))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Path]:
        real = self._real()
        parent = real.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield real
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @staticmethod
    def _read(real: Path) -> str:
        try:
            with open(real, encoding="utf-8", errors="surrogateescape", newline="") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    @staticmethod
    def _write(real: Path, text: str, *, durable_rename: bool = True) -> None:
        try:
            st: os.stat_result | None = real.stat()
        except FileNotFoundError:
            st = None
        mode = 0o600 if st is None else stat.S_IMODE(st.st_mode) & 0o755 & ~0o022
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".sshnpd", dir=real.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape",
                           newline="") as fh:
                fh.write(text)
                fh.flush()
                os.fchmod(fh.fileno(), mode)
                if st is not None and os.geteuid() == 0:
                    os.fchown(fh.fileno(), st.st_uid, st.st_gid)
                os.fsync(fh.fileno())
            os.replace(tmp, real)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if not durable_rename:
            return
        with contextlib.suppress(OSError):  # make the rename durable
            dfd = os.open(real.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _edit(self, change: Callable[[list[str]], list[str] | None], *,
              durable_rename: bool = True) -> bool:
        """Apply ``change`` to the file's lines under the lock; None = no change needed.

        ``durable_rename=False`` skips the directory fsync after the rename: after a power
        cut the file is then the old one or the new one, both whole (the temp file is
        always fsynced first, so the other lines are never at risk)."""
        with self._locked() as real:
            lines = self._read(real).splitlines(keepends=True)  # other lines: kept verbatim
            new = change(list(lines))
            if new is None:
                return False
            self._write(real, "".join(x if x.endswith(("\n", "\r")) else x + "\n"
                                      for x in new), durable_rename=durable_rename)
            return True

    # -- operations ------------------------------------------------------------------------

    def lines(self) -> list[str]:
        """Current lines without their line ends."""
        with self._locked() as real:
            return self._read(real).splitlines()

    def add_ephemeral(self, public_key: str, session_id: str, local_sshd_port: int,
                      extra_options: str = "", *, owner: str | None = None,
                      until: int | None = None, holder: int | None = None) -> str:
        """Authorize a session's ephemeral key; returns the line written."""
        line = ephemeral_line(public_key, session_id, local_sshd_port, extra_options,
                              owner=owner, until=until, holder=holder)
        blob = _key_blob(line)

        def change(lines: list[str]) -> list[str] | None:
            if any(_key_blob(x) == blob for x in lines):
                return None  # same key already there (official: skip if present)
            return [*lines, line]

        # a session's key need not outlive a power cut (the session does not): no directory
        # fsync, which is half the time of this write, on the set-up path of every session
        self._edit(change, durable_rename=False)
        return line

    def remove_session(self, session_id: str) -> int:
        """Remove the ephemeral line(s) of one session; returns how many were removed."""
        sid = validate_session_id(session_id)
        removed = 0

        def change(lines: list[str]) -> list[str] | None:
            nonlocal removed
            keep = [x for x in lines if _ephemeral_sid(x) != sid]
            removed = len(lines) - len(keep)
            return keep if removed else None

        self._edit(change)
        return removed

    def remove_all_ephemeral(self, owner: str | None = None, now: float | None = None, *,
                             alive: Callable[[int], bool] | None = None) -> int:
        """Start-up clean-up: drop ``sshnp_ephemeral_*`` lines that are leftovers.

        ``owner=None`` drops every one. With ``owner``: lines of that owner, untagged lines
        (official daemon, or older) and lines whose ``until`` has passed; another owner's
        unexpired lines stay (that daemon is alive and removes them itself), and so do our
        own unexpired lines whose ``holder`` pid is ``alive`` (a session that outlived the
        previous daemon: its session host removes the line).
        """
        removed = 0
        t = time.time() if now is None else now

        def stale(line: str) -> bool:
            tag = _ephemeral_tag(line)
            if tag is None:
                return False
            if tag.until is not None and tag.until <= t:
                return True
            if (owner is not None and tag.owner == owner and tag.holder is not None
                    and alive is not None and alive(tag.holder)):
                return False
            return owner is None or tag.owner is None or tag.owner == owner

        def change(lines: list[str]) -> list[str] | None:
            nonlocal removed
            keep = [x for x in lines if not stale(x)]
            removed = len(lines) - len(keep)
            return keep if removed else None

        self._edit(change)
        return removed

    def remove_expired(self, now: float | None = None) -> int:
        """Periodic sweep: lines whose ``until`` has passed, whoever wrote them."""
        t = time.time() if now is None else now
        removed = 0

        def change(lines: list[str]) -> list[str] | None:
            nonlocal removed
            keep = []
            for x in lines:
                tag = _ephemeral_tag(x)
                if tag is not None and tag.until is not None and tag.until <= t:
                    continue
                keep.append(x)
            removed = len(lines) - len(keep)
            return keep if removed else None

        self._edit(change)
        return removed

    def ephemeral_sessions(self) -> list[str]:
        return [sid for sid in (_ephemeral_sid(x) for x in self.lines()) if sid is not None]

    def add_client_key(self, public_key: str, permissions: str = "") -> bool:
        """``-s``: append a client's public key (validated) unless already present.

        ``permissions`` is the operator's ``-S`` options prefix. Returns True if written.
        """
        key = validate_client_public_key(public_key)
        perms = permissions.strip()
        if perms and not _OPTION_SAFE.fullmatch(perms):
            raise AuthorizedKeysError("sshpublickey permissions must be one printable line")
        line = f"{perms} {key}" if perms else key
        blob = _key_blob(key)

        def change(lines: list[str]) -> list[str] | None:
            if any(_key_blob(x) == blob for x in lines):
                return None
            return [*lines, line]

        return self._edit(change)
