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
PKGS=(openssh-server openssh-client redis-server socat nftables iptables iproute2 tcpdump make)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  else
    say "not root: cannot install ${missing[*]}; tests that need them are skipped"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing the project and test dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  "$VENV/bin/python" -m pip install -q -e '.[test]' >&2
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
