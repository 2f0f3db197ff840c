"""Every command shown in README.md and docs/ is exercised here.

Convention (docs/index.md, "Commands in these pages"):

* Every fenced block has a language tag. ``console``, ``bash``, ``sh`` and ``shell`` blocks
  hold commands, one per line (``\\`` continues a line, ``#`` starts a comment); command
  output goes in ``text`` blocks.
* A command block is **run**, unless the line right before its fence is
  ``<!-- docs-test: skip: REASON -->`` (the reason is required).
* ``<!-- docs-test: file: NAME -->`` before any block: the test writes the block to NAME (in
  the page's current directory at that point; ``~/`` is HOME; directories are created) before
  running the next command block.
* ``<!-- docs-test: setup: NAME -->`` before a command block: run ``SETUPS[NAME]`` first, a
  small hidden preparation a reader has done before (key files from elsewhere, ssh access to
  the device, a Redis, a running plane...). Keep them few; the page itself should say the rest.
* Pages are run as one bash session each (``set -euo pipefail``, so ``cd`` and ``export``
  carry over), in a sandbox: a temporary HOME, no ``ANSIBLE_*``/``NOPORTS_*``/``SSL_CERT_FILE``
  from the caller, the repository as the starting directory, the virtualenv first on PATH.
  A line ending in ``&`` starts a long-running program in the background; the test waits
  for its "ready" line (``READY``; in the file the line sends its output to when it ends in
  ``> FILE 2>&1 &``, as the pages write it so that logs do not flood the reader's terminal)
  and stops every process of the session at the end.
* Pages that need a special environment are listed in ``ENVIRONMENTS``. ``bare-device``:
  root, a private network namespace (``unshare -n``) with nothing listening and no ``USER``
  or ``LOGNAME`` in the environment: a machine where the page must start its own sshd.
  ``device``: root,
  a private network namespace (``unshare -n``) with an OpenSSH sshd on 127.0.0.1:22 that
  reads ``$HOME/.ssh/authorized_keys``, like a device's. ``host``: root, a private mount and
  network namespace (``unshare -m -n``) that looks like a server of the examples: overlays
  over /etc, /srv, /var/lib, /root and /home (writes stay in the test's tmp dir), fresh /run
  and /tmp, the example host names in /etc/hosts as 127.0.0.1, HOME=/root as the starting
  directory, and the sshd of ``device``. Both skip themselves when they cannot be set up.
* The public atPlatform (the programs' defaults: ``--root-domain root.atsign.org:64``, TLS
  trusted through the system CA store) is played, in the ``host`` environment, by the setup
  ``public-atplatform``: our own plane (``noports plane up``) in a nested network namespace
  reached over a veth pair at 198.51.100.64, which /etc/hosts (overlay) names
  ``root.atsign.org`` (its atDirectory on port 64) and ``standin.atsign.zone`` (the atServer
  host its directory hands out); its server certificate names both and its CA is appended to
  /etc/ssl/certs/ca-certificates.crt (overlay), the bundle Python's default SSL context
  loads. The atSigns whose keys are in ~/.atsign/keys are hosted there with those keys. So
  the documented commands run unchanged, without ``--root-domain``, ``--ca-file`` or
  ``SSL_CERT_FILE``; what the stand-in cannot show is Atsign's registrar and activation.
* A page's stdin is a pipe at EOF (never the terminal).

Checks on every command line, run or skipped: each of our programs (noports, atdirectory,
atserver, srvd, sshnpd, sshnp) is called with subcommands and flags that its real ``--help``
lists; ``make`` targets exist in the Makefile. Plus: every program's ``--help`` runs; the
error messages quoted in docs/troubleshooting.md occur in the sources; every relative link
in README.md and docs/ resolves.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
BIN = Path(sys.executable).parent
PROGRAMS = ("noports", "atdirectory", "atserver", "srvd", "sshnpd", "sshnp", "npt")
COMMAND_LANGS = {"console", "bash", "sh", "shell"}

# background programs: the line that says they are ready (stdout or stderr)
READY = {
    "noports": r"press Ctrl-C to stop",
    "srvd": r"srvd \S+ ready",
    "sshnpd": r"sshnpd \S+ ready",
    "atdirectory": r"atdirectory listening on",
    "atserver": r"atserver \S+ listening on",
    "redis-server": r"Ready to accept connections",
    "sshd": r"Server listening on \S+ port",
}
# pages run in a special environment (others: the plain sandbox)
ENVIRONMENTS = {
    "docs/quickstart.md": "bare-device",
    "docs/atserver.md": "host",
    "docs/cli.md": "host",
    "docs/control-plane.md": "host",
    "docs/directory.md": "host",
    "docs/keys-and-onboarding.md": "host",
    "docs/public-atplatform.md": "host",
    "docs/scale.md": "host",
    "docs/sshnpd.md": "host",
}
PAGE_TIMEOUT = 150
# skips for blocks whose page must not carry a marker (README's first lines stay as they are):
# (page, a line of the block) -> reason
SKIPS = {
    ("README.md", "make test"): "make test runs this test itself; make demo runs the whole "
                                "demo (tests/integration/test_demo.py)",
}

MARK_RE = re.compile(r"^\s*<!--\s*docs-test:\s*(skip|file|setup):\s*(.*?)\s*-->\s*$")
FENCE_RE = re.compile(r"^(\s*)```(.*)$")


@dataclass
class Block:
    page: Path
    line: int               # 1-based line of the opening fence
    lang: str
    text: str
    skip: str | None = None
    file: str | None = None
    setup: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{rel_path(self.page)}:{self.line}"

    def commands(self) -> list[tuple[int, str]]:
        """(line, command) pairs: continuations joined, blank and comment lines dropped."""
        out: list[tuple[int, str]] = []
        buf, start = "", 0
        for i, raw in enumerate(self.text.splitlines()):
            line = raw.rstrip()
            if not buf:
                start = self.line + 1 + i
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            out.append((start, (buf + line).strip()))
            buf = ""
        if buf:
            out.append((start, buf.strip()))
        return out


def rel_path(page: Path) -> str:
    return str(page.relative_to(REPO)) if page.is_relative_to(REPO) else str(page)


def parse_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).strip()
        j = i + 1
        body: list[str] = []
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        block = Block(page, i + 1, lang, "\n".join(body) + "\n")
        for (name, needle), reason in SKIPS.items():
            if rel_path(page) == name and any(ln.startswith(needle) for ln in body):
                block.skip = reason
        k = i - 1
        while k >= 0 and (mm := MARK_RE.match(lines[k])):
            if mm.group(1) == "skip":
                block.skip = mm.group(2)
            elif mm.group(1) == "setup":
                block.setup.insert(0, mm.group(2))
            else:
                block.file = mm.group(2)
            k -= 1
        blocks.append(block)
        i = j + 1
    return blocks


ALL_BLOCKS = [b for p in PAGES for b in parse_blocks(p)]
COMMAND_BLOCKS = [b for b in ALL_BLOCKS if b.lang in COMMAND_LANGS]


# --- the convention itself -----------------------------------------------------------------

def test_every_block_is_tagged_and_every_skip_has_a_reason():
    problems = []
    for b in ALL_BLOCKS:
        if not b.lang:
            problems.append(f"{b.where}: fenced block without a language tag "
                            "(commands: console/bash/sh; anything else: text, yaml, ...)")
        if b.skip is not None and len(b.skip.strip()) < 8:
            problems.append(f"{b.where}: docs-test skip needs a reason")
        if b.skip is not None and b.lang not in COMMAND_LANGS:
            problems.append(f"{b.where}: docs-test skip on a {b.lang or 'untagged'} block")
        for name in b.setup:
            if name not in SETUPS:
                problems.append(f"{b.where}: no docs-test setup {name!r} (has {sorted(SETUPS)})")
            if b.lang not in COMMAND_LANGS or b.skip is not None:
                problems.append(f"{b.where}: docs-test setup on a block that is not run")
    assert not problems, "\n".join(problems)


def test_there_are_commands_to_run():
    run = [b for b in COMMAND_BLOCKS if b.skip is None]
    assert any(b.page.name == "quickstart.md" for b in run)
    assert len(run) >= 5, [b.where for b in run]


# --- --help of every program, and every documented subcommand/flag -------------------------

@functools.cache
def help_text(prog: str, sub: tuple[str, ...]) -> str:
    proc = subprocess.run([str(BIN / prog), *sub, "--help"], capture_output=True, text=True,
                          timeout=30, env=_clean_env(Path("/nonexistent")), check=False)
    assert proc.returncode == 0, f"{prog} {' '.join(sub)} --help: {proc.stderr}"
    return proc.stdout


def subcommands(help_out: str) -> set[str]:
    """Subcommand names: the '{a,b,c}' choices and the indented list under 'positional
    arguments:' (options' choices such as '{text,json}' are not subcommands)."""
    names: set[str] = set()
    m = re.search(r"^positional arguments:\n((?:  .*\n?)+)", help_out, re.M)
    if m:
        section = m.group(1)
        for mm in re.finditer(r"^  \{([a-z][a-z0-9_,-]*)\}", section, re.M):
            names.update(mm.group(1).split(","))
        for line in section.splitlines():
            mm = re.match(r"^    ([a-z][a-z0-9-]*)(?:\s{2,}\S|$)", line)
            if mm:
                names.add(mm.group(1))
    return names


def flags(help_out: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][A-Za-z0-9-]*)", help_out))


@pytest.mark.parametrize("prog", PROGRAMS)
def test_help_runs(prog):
    out = help_text(prog, ())
    assert out.startswith("usage: " + prog), out[:200]
    for sub in sorted(subcommands(out)):
        inner = help_text(prog, (sub,))
        for sub2 in sorted(subcommands(inner)):
            help_text(prog, (sub, sub2))


def _program_calls(command: str) -> list[list[str]]:
    """The argv of each of our programs in a shell line (pipes, &&, ;, $(...) split)."""
    try:
        words = shlex.split(command, comments=True, posix=True)
    except ValueError:
        words = command.split()
    calls, cur = [], None
    for w in words:
        if w in ("|", "||", "&&", ";", "&") or w.startswith("$("):
            cur = None
            continue
        if " " in w and cur is None:  # e.g. -o ProxyCommand='sshnp --stdio ...'
            calls += _program_calls(w.split("=", 1)[-1])
            continue
        base = os.path.basename(w.lstrip("$("))
        if cur is None and base in PROGRAMS:
            cur = [base]
            calls.append(cur)
        elif cur is not None:
            if w.startswith((">", "2>", "<")) or w.endswith(("|", ";", "&")):
                cur.append(w.rstrip("|;&"))
                cur = None
            else:
                cur.append(w)
    return calls


def check_call(argv: list[str]) -> list[str]:
    prog, args = argv[0], argv[1:]
    sub: tuple[str, ...] = ()
    errors: list[str] = []
    out = help_text(prog, sub)
    known_flags = flags(out)
    for a in args:
        if a in (">", "2>", "<", "|") or a.startswith((">", "2>", "<")):
            break
        if a == "--":
            break
        if a.startswith("-") and a != "-":
            name = a.split("=", 1)[0]
            if name not in known_flags:
                errors.append(f"{' '.join((prog, *sub))}: no flag {name}")
            continue
        subs = subcommands(out)
        if subs and a in subs and len(sub) < 2:
            sub = (*sub, a)
            out = help_text(prog, sub)
            known_flags = flags(out) | known_flags
        elif subs and prog != "sshnp" and re.fullmatch(r"[a-z][a-z-]*", a):
            errors.append(f"{' '.join((prog, *sub))}: no subcommand {a!r} (has {sorted(subs)})")
    return errors


def _command_lines() -> list[tuple[str, str]]:
    out = []
    for b in COMMAND_BLOCKS:
        for line, cmd in b.commands():
            out.append((f"{b.page.relative_to(REPO)}:{line}", cmd))
    return out


def test_documented_commands_use_existing_subcommands_and_flags():
    problems = []
    seen = 0
    for where, cmd in _command_lines():
        for call in _program_calls(cmd):
            seen += 1
            problems += [f"{where}: {e}   [{cmd}]" for e in check_call(call)]
    assert seen > 30, seen
    assert not problems, "\n".join(problems)


def test_flag_check_can_fail():
    assert check_call(["sshnp", "--no-such-flag"]) == ["sshnp: no flag --no-such-flag"]
    assert check_call(["noports", "plane", "init", "--dir", "x", "--bogus"])
    assert check_call(["noports", "plane", "explode"])
    assert check_call(["noports", "planes"])
    assert not check_call(["sshnp", "-f", "@a", "uptime"])  # sshnp's positional: the command
    assert not check_call(["noports", "atsign", "create", "@a", "--dir", "d"])


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-zA-Z][\w-]*):", text, re.M))


def test_make_targets_exist():
    targets = _make_targets()
    problems = []
    for where, cmd in _command_lines():
        m = re.match(r"^make\s+([\w-]+)", cmd)
        if m and m.group(1) not in targets:
            problems.append(f"{where}: make has no target {m.group(1)}")
    assert not problems, "\n".join(problems)


# --- troubleshooting messages occur in the sources -----------------------------------------

@functools.cache
def _source_text() -> str:
    text = "\n".join(p.read_text(encoding="utf-8")
                     for root in ("src", "plugins")
                     for p in sorted((REPO / root).rglob("*.py")))
    text = re.sub(r"\"\s*\n\s*[fr]?\"", "", text)  # implicit string concatenation across lines
    return text


def test_troubleshooting_messages_are_real():
    page = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    messages = re.findall(r"^#{3,4} `(.+)`\s*$", page, re.M)
    assert len(messages) >= 20, messages
    src = _source_text()
    problems = []
    for msg in messages:
        pieces = re.split(r"…|\s\(|\)|: |\?", msg)
        checked = [p.strip(" ,.") for p in pieces if len(p.strip(" ,.")) >= 8]
        assert checked, f"nothing to check in {msg!r}"
        missing = [p for p in checked if p not in src]
        if missing:
            problems.append(f"{msg!r}: not in src/ or plugins/: {missing}")
    assert not problems, "\n".join(problems)


# --- links -----------------------------------------------------------------------------------

def test_relative_links_resolve():
    problems = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                problems.append(f"{page.relative_to(REPO)}: broken link {target}")
    assert not problems, "\n".join(problems)


# --- running the command blocks ------------------------------------------------------------

def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANSIBLE_", "NOPORTS_", "PYTEST", "VIRTUAL_ENV"))
           and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR", "HOME", "XDG_CONFIG_HOME",
                         "XDG_STATE_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME")}
    env.update(HOME=str(home), PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
               USER=env.get("USER") or pwd.getpwuid(os.getuid()).pw_name,
               PYTHONUNBUFFERED="1", LC_ALL="C.UTF-8", ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0")
    return env


PRELUDE = r"""
set -euo pipefail
docs_ready() {  # pid log regex: wait until the log matches, fail if the process died
  local pid=$1 log=$2 re=$3 i
  for i in $(seq 600); do
    if grep -Eq "$re" "$log" 2>/dev/null; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "docs-test: background process exited before it was ready:" >&2; cat "$log" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "docs-test: not ready after 60s: $re" >&2; cat "$log" >&2; return 1
}
"""

DEVICE_PRELUDE = r"""
ip link set lo up
mkdir -p /run/sshd
cat > "$DOCS_SANDBOX/sshd_config" <<EOF
ListenAddress 127.0.0.1:22
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
HostKey /etc/ssh/ssh_host_rsa_key
AuthorizedKeysFile $HOME/.ssh/authorized_keys .ssh/authorized_keys
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PidFile $DOCS_SANDBOX/sshd.pid
Subsystem sftp internal-sftp
EOF
/usr/sbin/sshd -D -e -f "$DOCS_SANDBOX/sshd_config" > "$DOCS_SANDBOX/sshd.log" 2>&1 &
docs_ready $! "$DOCS_SANDBOX/sshd.log" "listening on 127.0.0.1 port 22"
"""

# names the example commands use; in the "host" environment they all resolve to loopback
EXAMPLE_HOSTS = ("plane.example.net", "plane.example.com", "root.example.org", "root.example.net",
                 "shard1.example.org", "relay1.example.org", "relay2.example.org",
                 "relay.example.net", "vip.example.org", "vip.example.net",
                 "atserver.example.net", "dev1")

# "host": a private mount and network namespace (unshare -m -n) that looks like a server of
# the examples: overlays over /etc, /srv, /var/lib, /root and /home (writes stay in the test's
# tmp dir), fresh /run and /tmp, the example host names in /etc/hosts, HOME=/root, and the
# device's sshd on 127.0.0.1:22 (as in "device"). The page starts in $HOME.
HOST_PRELUDE = r"""
mount --make-rprivate /
for d in /etc /srv /var/lib /root /home; do
  mkdir -p "$DOCS_SANDBOX/overlay/upper$d" "$DOCS_SANDBOX/overlay/work$d" "$d"
  mount -t overlay overlay \
    -o "lowerdir=$d,upperdir=$DOCS_SANDBOX/overlay/upper$d,workdir=$DOCS_SANDBOX/overlay/work$d" "$d"
done
mount -t tmpfs tmpfs /run
# a fresh /tmp, but the test's own dirs under it (its tmp dir; the checkout and its .venv
# when CI cloned it into /tmp) stay visible at the same paths
keep=()
for k in "$DOCS_SANDBOX" "$DOCS_REPO"; do
  case "$k" in /tmp/*) keep+=("$k") ;; esac
done
i=0
for k in "${keep[@]}"; do
  mkdir -p "/run/docs-keep/$i"; mount --bind "$k" "/run/docs-keep/$i"; i=$((i+1))
done
mount -t tmpfs tmpfs /tmp
i=0
for k in "${keep[@]}"; do
  mkdir -p "$k"; mount --bind "/run/docs-keep/$i" "$k"; i=$((i+1))
done
""" + f"""echo "127.0.0.1 {' '.join(EXAMPLE_HOSTS)}" >> /etc/hosts
cd "$HOME"
"""

SSH_KEY = r"""
mkdir -p -m 700 ~/.ssh
ssh-keygen -q -t ed25519 -N '' -f ~/.ssh/id_ed25519
cat ~/.ssh/id_ed25519.pub >> ~/.ssh/authorized_keys
"""

_REDIS = r"""
mkdir -p /var/lib/redis-docs
redis-server --bind 127.0.0.1 --port 6379 --dir /var/lib/redis-docs {args} \
  > "$DOCS_SANDBOX/redis.log" 2>&1 &
docs_ready $! "$DOCS_SANDBOX/redis.log" "Ready to accept connections"
"""

# hidden preparation a reader has done before a block (`<!-- docs-test: setup: NAME -->`):
# keep these few and small; everything else belongs in the page itself
SETUPS = {
    # atSign key files from elsewhere: the official demo files (tests/fixtures), in the
    # current directory
    "atkeys-files": r"""
cp "$DOCS_REPO"/tests/fixtures/official-demo-atkeys/*.atKeys .
""",
    # ssh access to the device "dev1" (this host's sshd) with the reader's own key
    "ssh-dev1": SSH_KEY + r"""
ssh-keyscan -p 22 127.0.0.1 2>/dev/null | sed 's/^127.0.0.1/dev1/' >> ~/.ssh/known_hosts
""",
    # the reader's ssh key ~/.ssh/id_ed25519, authorized for root on the device (this host)
    "ssh-key": SSH_KEY,
    # a user pi on the device (this host; /etc and /home are overlays) that accepts the
    # reader's ~/.ssh/id_ed25519
    "user-pi": r"""
useradd -m -l -p '*' -s /bin/bash pi
install -d -m 700 -o pi -g pi /home/pi/.ssh
install -m 600 -o pi -g pi ~/.ssh/id_ed25519.pub /home/pi/.ssh/authorized_keys
""",
    # the relay host's public address 203.0.113.7 (srvd -i), here on lo
    "relay-address": r"""
ip addr add 203.0.113.7/32 dev lo
""",
    # A local stand-in for the public atPlatform, so that the programs' defaults run: no
    # --root-domain (root.atsign.org:64), no --ca-file (the system CA store). It is our own
    # plane on "another host": the network namespace `atplatform` behind a veth pair, at
    # 198.51.100.64, which /etc/hosts gives the names root.atsign.org (its atDirectory, on
    # port 64) and standin.atsign.zone (its atServers, the host name the directory hands
    # out). Its server certificate names both; its CA is appended to the system bundle
    # /etc/ssl/certs/ca-certificates.crt (in the /etc overlay), where Python's default
    # SSL context looks. Every atSign whose keys are in ~/.atsign/keys is hosted there with
    # those keys (`noports atsign import`), as if the reader had activated them on the
    # public atPlatform.
    "public-atplatform": r"""
ip netns add atplatform
ip link add np-atplatform type veth peer name eth0 netns atplatform
ip addr add 198.51.100.1/24 dev np-atplatform
ip link set np-atplatform up
ip -n atplatform addr add 198.51.100.64/24 dev eth0
ip -n atplatform link set eth0 up
ip -n atplatform link set lo up
echo "198.51.100.64 root.atsign.org standin.atsign.zone" >> /etc/hosts
noports plane init -q --dir "$DOCS_SANDBOX/atplatform" --host standin.atsign.zone \
  --directory-port 64 --name root.atsign.org
cat "$DOCS_SANDBOX/atplatform/tls/ca.pem" >> /etc/ssl/certs/ca-certificates.crt
ip netns exec atplatform noports plane up --dir "$DOCS_SANDBOX/atplatform" \
  > "$DOCS_SANDBOX/atplatform.log" 2>&1 &
docs_ready $! "$DOCS_SANDBOX/atplatform.log" "press Ctrl-C to stop"
for k in ~/.atsign/keys/*_key.atKeys; do
  if [ -e "$k" ]; then
    noports atsign import -q --no-copy --dir "$DOCS_SANDBOX/atplatform" "$k"
  fi
done
""",
    # the atSigns of docs/public-atplatform.md, activated on this host (keys in
    # ~/.atsign/keys): made on the stand-in of "public-atplatform"
    "public-my-atsigns": r"""
for a in @my_client @my_devices @my_relay; do
  noports atsign create -q --dir "$DOCS_SANDBOX/atplatform" "$a"
done
""",
    # CRAM secrets of provisioned atSigns, 0600 files in /run
    "cram-files": r"""
(umask 077 && for a in relay1 relay2 dev1; do openssl rand -hex 32 > /run/$a.cram; done)
""",
    # a running plane at ~/plane (plane.example.net:6464) with @alice_client and
    # @alice_device (keys in ~/.atsign/keys), its CA in /etc/noports/ca.pem
    "plane-alice": r"""
noports plane init -q --dir ~/plane --name plane.example.net
noports plane up --dir ~/plane > "$DOCS_SANDBOX/plane.log" 2>&1 &
docs_ready $! "$DOCS_SANDBOX/plane.log" "press Ctrl-C to stop"
noports atsign create -q @alice_client --dir ~/plane
noports atsign create -q @alice_device --dir ~/plane
install -D -m 644 ~/plane/tls/ca.pem /etc/noports/ca.pem
""",
    # the plane's CA where a relay or device host keeps it
    "etc-noports-ca": r"""
install -D -m 644 ~/plane/tls/ca.pem /etc/noports/ca.pem
""",
    # a Redis on 127.0.0.1:6379 (no password: loopback only)
    "redis": _REDIS.format(args=""),
    # a Redis on 127.0.0.1:6379 (appendonly) whose password is in /root/redis.pw
    "redis-password": r"""
umask 077; head -c 24 /dev/urandom | base64 > /root/redis.pw; umask 022
""" + _REDIS.format(args='--appendonly yes --requirepass "$(cat /root/redis.pw)"'),
}


def build_script(page_blocks: list[Block], logdir: Path) -> str:
    parts = [PRELUDE]
    n = 0
    for b in page_blocks:
        if b.file:
            tag = "DOCS_TEST_EOF"
            dest = (f'"$HOME"/{shlex.quote(b.file[2:])}' if b.file.startswith("~/")
                    else shlex.quote(b.file))
            parts.append(f"echo '::: write {b.file}' >&2\nmkdir -p \"$(dirname {dest})\"\n"
                         f"cat > {dest} <<'{tag}'\n{b.text}{tag}\n")
            continue
        if b.lang not in COMMAND_LANGS or b.skip is not None:
            continue
        for name in b.setup:
            assert name in SETUPS, f"{b.where}: no docs-test setup {name!r} (has {sorted(SETUPS)})"
            parts.append(f"echo '::: setup {name}' >&2\n{SETUPS[name]}")
        for line, cmd in b.commands():
            where = f"{rel_path(b.page)}:{line}"
            parts.append(f"echo {shlex.quote(f'::: {where}: {cmd}')} >&2")
            m = re.match(r"^(.*?[^&])&\s*(#.*)?$", cmd)
            if m:
                n += 1
                prog = os.path.basename(shlex.split(m.group(1))[0])
                assert prog in READY, f"{where}: no READY pattern for background {prog}"
                own = re.match(r"^(.*\S)\s*>\s*(\S+)\s+2>&1\s*$", m.group(1))
                if own:  # the page names its log file: run it as written, wait on that file
                    parts.append(f"{m.group(1).strip()} &\n"
                                 f"docs_ready $! {own.group(2)} {shlex.quote(READY[prog])}")
                    continue
                log = logdir / f"bg-{n}-{prog}.log"
                parts.append(f"{{ {m.group(1).strip()} ; }} > {log} 2>&1 &\n"
                             f"docs_ready $! {log} {shlex.quote(READY[prog])}")
            else:
                parts.append(cmd)
    parts.append("echo '::: done' >&2")
    return "\n".join(parts) + "\n"


def _run_page(rel: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    page = REPO / rel
    blocks = parse_blocks(page)
    env_name = ENVIRONMENTS.get(rel, "sandbox")
    # a short HOME: OpenSSH's ControlPath (~/.ansible/cp/...) must fit a unix socket path
    # "bare-device": the page's own sshd checks (StrictModes) that no directory above
    # ~/.ssh/authorized_keys is world-writable, as /tmp is: a HOME under root's /run instead
    short = Path(tempfile.mkdtemp(prefix="np-docs-",
                                  dir="/run" if env_name == "bare-device" else "/tmp"))
    home = short / "home"
    logs = tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    script = build_script(blocks, logs)
    argv = ["bash", "-c", script]
    env = _clean_env(home)
    env["DOCS_SANDBOX"] = str(tmp_path)
    env["DOCS_REPO"] = str(REPO)
    if env_name == "device":
        script = PRELUDE + DEVICE_PRELUDE + script
        argv = ["unshare", "-n", "bash", "-c", script]
    elif env_name == "bare-device":
        script = PRELUDE + "ip link set lo up\n" + script
        argv = ["unshare", "-n", "bash", "-c", script]
        env.pop("USER", None)
        env.pop("LOGNAME", None)
    elif env_name == "host":
        env["HOME"] = "/root"
        script = PRELUDE + "ip link set lo up\n" + HOST_PRELUDE + DEVICE_PRELUDE + script
        argv = ["unshare", "-m", "-n", "bash", "-c", script]
    (tmp_path / "script.sh").write_text(script)
    # stdin: a pipe at EOF (as under ssh or CI), never the terminal
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _err = proc.communicate(timeout=PAGE_TIMEOUT)
    except subprocess.TimeoutExpired:
        out = ""
        proc.returncode = -1
    finally:
        # every process of the page's session: ours by construction (own session id)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(1.0 if sig == signal.SIGTERM else 0)
        if proc.poll() is None:
            out += proc.communicate()[0] or ""
        shutil.rmtree(short, ignore_errors=True)
    bg = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                 for p in sorted(logs.glob("*.log")))
    return subprocess.CompletedProcess(argv, proc.returncode, out, bg)


def _device_env_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace with an sshd on 127.0.0.1:22)"
    if not (shutil.which("unshare") and Path("/usr/sbin/sshd").exists()
            and Path("/etc/ssh/ssh_host_ed25519_key").exists()):
        return "needs unshare, /usr/sbin/sshd and /etc/ssh host keys"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"unshare -n does not work here: {probe.stderr.decode()[:200]}"
    return None


@functools.cache
def _host_env_reason() -> str | None:
    if reason := _device_env_reason():
        return reason
    if not shutil.which("redis-server"):
        return "needs redis-server"
    with tempfile.TemporaryDirectory() as tmp:
        for d in ("u", "w", "m"):
            os.mkdir(os.path.join(tmp, d))
        probe = subprocess.run(
            ["unshare", "-m", "-n", "sh", "-c",
             f"mount --make-rprivate / && mount -t overlay overlay "
             f"-o lowerdir=/etc,upperdir={tmp}/u,workdir={tmp}/w {tmp}/m"],
            capture_output=True, check=False)
    if probe.returncode != 0:
        return f"unshare -m -n with overlayfs does not work here: {probe.stderr.decode()[:200]}"
    return None


@functools.cache
def _veth_reason() -> str | None:
    """The "public-atplatform" stand-in runs in a nested network namespace behind a veth pair."""
    probe = subprocess.run(
        ["unshare", "-n", "ip", "link", "add", "np-probe0", "type", "veth", "peer", "name",
         "np-probe1"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"no veth pairs here (public atPlatform stand-in): {probe.stderr.decode()[:200]}"
    return None


RUN_PAGES = sorted({str(b.page.relative_to(REPO)) for b in COMMAND_BLOCKS if b.skip is None})


@pytest.mark.timeout(PAGE_TIMEOUT + 30)
@pytest.mark.parametrize("rel", RUN_PAGES)
def test_page_commands_run(rel, tmp_path):
    if ENVIRONMENTS.get(rel) in ("device", "bare-device") and (
            reason := _device_env_reason()):
        pytest.skip(reason)
    if ENVIRONMENTS.get(rel) == "host" and (reason := _host_env_reason()):
        pytest.skip(reason)
    if (any("public-atplatform" in b.setup for b in parse_blocks(REPO / rel) if b.skip is None)
            and (reason := _veth_reason())):
        pytest.skip(reason)
    result = _run_page(rel, tmp_path)
    tail = "\n".join(result.stdout.splitlines()[-60:])
    assert result.returncode == 0 and "::: done" in result.stdout, (
        f"{rel}: a command failed (the last '::: file:line' is the one):\n{tail}\n"
        f"background logs:{result.stderr[-4000:]}")


def test_runner_fails_on_a_bad_command(tmp_path):
    page = tmp_path / "bad.md"
    page.write_text(textwrap.dedent("""\
        ```console
        sshnp --help
        sshnp --definitely-not-a-flag
        ```
        """))
    script = build_script(parse_blocks(page), tmp_path)
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=_clean_env(tmp_path),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert "::: done" not in proc.stderr


# --- Ansible options named in the docs exist (ansible-doc of the plugins) -------------------

@functools.cache
def ansible_doc(kind: str, name: str, tmp: str) -> dict:
    import json
    root = Path(tmp) / "ansible_collections" / "noports"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "sshnp").exists():
        (root / "sshnp").symlink_to(REPO)
    env = _clean_env(Path(tmp))
    env["ANSIBLE_COLLECTIONS_PATH"] = tmp
    proc = subprocess.run([str(BIN / "ansible-doc"), "-t", kind, name, "--json"], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[name]["doc"]


def test_ansible_options_in_docs_exist(tmp_path_factory):
    if not (BIN / "ansible-doc").exists():
        pytest.skip("ansible-core is not installed")
    tmp = str(tmp_path_factory.mktemp("acol"))
    conn = ansible_doc("connection", "noports.sshnp.sshnp", tmp)["options"]
    inv = ansible_doc("inventory", "noports.sshnp.devices", tmp)["options"]
    names = set()
    for opt in (*conn.values(), *inv.values()):
        names.update(v["name"] for v in opt.get("vars") or [])
        names.update(e["name"] for e in opt.get("env") or [])
    problems = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for token in sorted(set(re.findall(r"\b(?:ansible_sshnp_|ANSIBLE_SSHNP_)\w+", text))):
            if token not in names:
                problems.append(f"{rel_path(page)}: {token} is not an option of the plugins")
        # keys of inventory-plugin YAML blocks
        for b in parse_blocks(page):
            if b.lang == "yaml" and re.search(r"^plugin: noports\.sshnp\.devices", b.text, re.M):
                for key in re.findall(r"^([a-z_]+):", b.text, re.M):
                    if key not in inv and key != "plugin":
                        problems.append(f"{b.where}: {key} is not an inventory option")
    assert not problems, "\n".join(problems)
