#!/usr/bin/env bash
# Make a fresh machine ready: Debian packages (when root), then the project virtualenv.
# Idempotent and quiet when there is nothing to do; progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

say() { echo "bootstrap: $*" >&2; }

# Debian packages the tests and demo use: real OpenSSH, Redis, socat/tcpdump for baselines and
# captures, nftables/iptables + iproute2 for "no open ports" namespaces.
# python3-venv: so a non-root user's `python3 -m venv` works with Debian's python3.
# openssl, ca-certificates: the docs test's CRAM secrets and its system-trust-store stand-in.
PKGS=(openssh-server openssh-client redis-server socat nftables iptables iproute2 tcpdump make
      python3-venv openssl ca-certificates)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  asroot=()
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    asroot=(sudo -n)  # passwordless sudo: install as root would
  fi
  if { [ "$(id -u)" = 0 ] || ((${#asroot[@]})); } && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${missing[*]}"
    "${asroot[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    "${asroot[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  else
    say "not root: cannot install ${missing[*]}; tests that need them are skipped" \
        "(as root: apt-get install ${missing[*]})"
  fi
fi

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c '' 2>/dev/null; then
  # a .venv whose interpreter vanished (or is unreadable to this user) is made anew
  rm -rf "$VENV"
  say "creating virtualenv $VENV with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  if ! "$PY" -m venv "$VENV" >&2; then
    say "error: '$PY -m venv' failed; install python3-venv (Debian) or set PYTHON=/path/to/python3"
    exit 1
  fi
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing the project and test dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e '.[test]' >&2
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
