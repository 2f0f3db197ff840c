#!/usr/bin/env bash
# Make a fresh machine ready: Debian packages (when root), then the project virtualenv.
# Idempotent and quiet when there is nothing to do; progress goes to stderr.
#
# Environment: VENV (default .venv), PYTHON (default python3), APT_LOCK_TIMEOUT (seconds to
# wait for another apt/dpkg to finish, default 300), BOOTSTRAP_EXTRA_PKGS (more Debian
# packages, space-separated). Sourcing this file defines the functions and runs nothing.
set -euo pipefail

say() { echo "bootstrap: $*" >&2; }

# Debian packages the tests and demo use: real OpenSSH, Redis, socat/tcpdump for baselines and
# captures, nftables/iptables + iproute2 for "no open ports" namespaces.
# python3-venv: so a non-root user's `python3 -m venv` works with Debian's python3.
# openssl, ca-certificates: the docs test's CRAM secrets and its system-trust-store stand-in.
# rsync: the documented rsync-through-the-tunnel recipe (docs/rsync.md) and its test.
PKGS=(openssh-server openssh-client redis-server socat nftables iptables iproute2 tcpdump make
      python3-venv openssl ca-certificates rsync)

# The locks apt-get and dpkg take (fcntl locks): another apt, dpkg or unattended-upgrades
# holding one makes apt-get fail at once with "Could not get lock"; we wait instead.
APT_LOCKS=(/var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock
           /var/cache/apt/archives/lock)

lock_holder() {  # FILE -> "pid N (command line)" of a process holding a lock on FILE, or ""
  local file=$1 dev ino major minor want line pid cmd
  [ -e "$file" ] || return 0
  read -r dev ino < <(stat -L -c '%d %i' "$file") || return 0
  major=$(( (dev >> 8) & 0xfff )); minor=$(( (dev & 0xff) | ((dev >> 12) & 0xfff00) ))
  want=$(printf '%02x:%02x:%s' "$major" "$minor" "$ino")
  # /proc/locks: "1: POSIX ADVISORY WRITE <pid> <maj:min:inode> <start> <end>"; lines with
  # "->" are waiters, not holders; OFD locks show pid -1 (holder unknown)
  while read -r line; do
    # shellcheck disable=SC2086  # split the /proc/locks line into its fields
    set -- $line
    [ "$2" = "->" ] && continue
    [ "$6" = "$want" ] || continue
    pid=$5
    if [ "$pid" -gt 0 ] 2>/dev/null; then
      cmd=$(tr '\0\n' '  ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-200 || true)
      echo "pid $pid (${cmd% })"
    else
      echo "a process (open file description lock; see: fuser $file)"
    fi
    return 0
  done < /proc/locks
}

busy_apt_lock() {  # -> "FILE held by pid N (cmd)" for the first held lock, or ""
  local f h
  for f in "${APT_LOCKS[@]}"; do
    h=$(lock_holder "$f")
    if [ -n "$h" ]; then echo "$f held by $h"; return 0; fi
  done
}

wait_apt_lock() {  # [TIMEOUT]: wait while another apt/dpkg holds a lock; 1 with a message
  local timeout=${1:-${APT_LOCK_TIMEOUT:-300}} start now busy said=0
  start=$(date +%s)
  while busy=$(busy_apt_lock) && [ -n "$busy" ]; do
    now=$(date +%s)
    if (( now - start >= timeout )); then
      say "error: the apt/dpkg lock $busy is still taken after ${timeout}s:" \
          "another package manager is running. Let it finish (or stop it), then run" \
          "'make bootstrap' again; APT_LOCK_TIMEOUT=<seconds> waits longer"
      return 1
    fi
    if (( said == 0 || (now - start) / 30 > said - 1 )); then
      say "waiting for the apt/dpkg lock $busy (another package manager is running;" \
          "up to ${timeout}s, APT_LOCK_TIMEOUT to change)"
      said=$(( (now - start) / 30 + 1 ))
    fi
    sleep 1
  done
  return 0
}

install_debian_packages() {
  local missing=() asroot=() p timeout=${APT_LOCK_TIMEOUT:-300}
  # shellcheck disable=SC2206  # word splitting of the extra list is intended
  local pkgs=("${PKGS[@]}" ${BOOTSTRAP_EXTRA_PKGS:-})
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    asroot=(sudo -n)  # passwordless sudo: install as root would
  fi
  if { [ "$(id -u)" = 0 ] || ((${#asroot[@]})); } && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${missing[*]}"
    wait_apt_lock "$timeout" || return 1
    # the lock may be taken again between our check and apt-get: apt waits for it too
    local apt=("${asroot[@]}" env DEBIAN_FRONTEND=noninteractive apt-get
               -o "DPkg::Lock::Timeout=$timeout")
    # (explicit returns: errexit does not apply inside a function called as `f || exit`)
    "${apt[@]}" update -qq >&2 || return 1
    "${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >&2 || return 1
  else
    say "not root: cannot install ${missing[*]}; tests that need them are skipped" \
        "(as root: apt-get install ${missing[*]})"
  fi
}

make_venv() {
  local VENV=${VENV:-.venv} PY=${PYTHON:-python3} stamp
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
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  cd "$(dirname "$0")/.."
  install_debian_packages || exit 1
  make_venv
fi
