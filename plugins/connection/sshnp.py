# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
# ruff: noqa: E402  (Ansible convention: DOCUMENTATION/EXAMPLES come before the imports)
"""``noports.sshnp.sshnp``: ansible.builtin.ssh with the sshnp client as ProxyCommand.

Why a subclass of the ssh plugin and not a new transport: OpenSSH then does everything that
Ansible users rely on (pipelining, become prompts, sftp/scp/piped transfers, retries,
``reset_connection``), and ControlMaster/ControlPersist make the OpenSSH master own the tunnel,
so a run costs one rendezvous per host whatever the number of tasks (aws_ssm's one session
per task is the anti-pattern, docs/reference/ansible-anchors.md#complaints-about-aws_ssm). The plugin only
adds options to the ssh/sftp/scp command line and turns client failures into
``AnsibleConnectionFailure`` naming the failed step.
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: sshnp
short_description: Run Ansible over SSH No Ports (OpenSSH through the sshnp client)
version_added: 0.1.0
description:
  - Reaches devices that accept no inbound connection. The device runs C(sshnpd); for each
    host the C(sshnp) client asks the control plane for a socket rendezvous and carries the
    device's sshd connection on its stdin/stdout, as an OpenSSH C(ProxyCommand).
  - This is C(ansible.builtin.ssh) with a few options added, so every ssh option below keeps
    working (pipelining, become, sftp/scp/piped transfers, retries, C(meta) C(reset_connection)).
  - ControlMaster/ControlPersist stay on, with a ControlPath and a C(HostKeyAlias) keyed on
    the device identity (client atSign, device atSign, device name, remote user, port), so the
    OpenSSH master owns the tunnel and a playbook run makes one rendezvous per host.
  - The device's sshd host keys arrive in the signed session response; the client writes them
    to O(known_hosts_file) under the C(HostKeyAlias) and OpenSSH checks them with
    C(StrictHostKeyChecking=yes).
  - Failures of the control plane, the relay or the device make the host UNREACHABLE with the
    client's one-line message naming the failed step.
author: noports.sshnp developers (@noports)
extends_documentation_fragment:
  - noports.sshnp.sshnp
  - noports.sshnp.sshnp.ssh
notes:
  - Users may write the short name C(ansible_connection=sshnp) only when the plugin is on the
    connection plugin path; see docs/ansible-connection.md. The fully qualified name
    C(noports.sshnp.sshnp) always works.
  - C(ansible.posix.synchronize) is not supported through this plugin (its rsync would not use
    the tunnel); use C(ansible.builtin.copy), or rsync with C(delegate_to) through an ssh_config
    C(Host) whose ProxyCommand is C(sshnp --stdio) (docs/rsync.md).
  - When the device's signed response pins a host key other than the pinned one (the device's
    sshd host key was rotated), the client replaces the pin and the plugin shows a warning with
    the old and new fingerprints, once per rendezvous.
  - O(host_key_checking=false) does not weaken the pinned host key check; use
    O(host_key_policy=accept-new) for daemons that do not pin.
  - O(port) is the device sshd port, passed to the client as C(--remote-sshd-port).
requirements:
  - The C(sshnp) client of the C(noports) Python distribution on the controller.
  - OpenSSH client 8.0 or newer on the controller.
seealso:
  - plugin: ansible.builtin.ssh
    plugin_type: connection
  - plugin: noports.sshnp.devices
    plugin_type: inventory
options:
  client_atsign:
    vars:
      - name: ansible_sshnp_client_atsign
    ini:
      - section: sshnp_connection
        key: client_atsign
  keys_file:
    vars:
      - name: ansible_sshnp_keys_file
    ini:
      - section: sshnp_connection
        key: keys_file
  root_domain:
    vars:
      - name: ansible_sshnp_root_domain
    ini:
      - section: sshnp_connection
        key: root_domain
  ca_file:
    vars:
      - name: ansible_sshnp_ca_file
    ini:
      - section: sshnp_connection
        key: ca_file
  relays:
    vars:
      - name: ansible_sshnp_relays
    ini:
      - section: sshnp_connection
        key: relays
  device_atsign:
    description:
      - The device atSign (the one C(sshnpd -a) runs as).
    type: string
    vars:
      - name: ansible_sshnp_device_atsign
    env:
      - name: ANSIBLE_SSHNP_DEVICE_ATSIGN
    ini:
      - section: sshnp_connection
        key: device_atsign
  device:
    description:
      - The device name (C(sshnpd -d)); one device atSign may serve many devices.
    type: string
    default: default
    vars:
      - name: ansible_sshnp_device
    env:
      - name: ANSIBLE_SSHNP_DEVICE
  tunnel_mode:
    description:
      - V(aes) carries the sshd bytes in an AES-256-CTR stream through the relay (NoPorts v5 default).
      - V(ssh) runs an outer SSH session with the device's ephemeral key and a direct-tcpip channel inside it.
      - Unset means the client's default.
    type: string
    choices: [aes, ssh]
    vars:
      - name: ansible_sshnp_tunnel_mode
    env:
      - name: ANSIBLE_SSHNP_TUNNEL_MODE
    ini:
      - section: sshnp_connection
        key: tunnel_mode
  relay_timeout:
    description:
      - Seconds to wait for each relay to answer the port request (client default 20).
    type: float
    vars:
      - name: ansible_sshnp_relay_timeout
    env:
      - name: ANSIBLE_SSHNP_RELAY_TIMEOUT
    ini:
      - section: sshnp_connection
        key: relay_timeout
  daemon_timeout:
    description:
      - Seconds to wait for the device daemon's session response (client default 15).
    type: float
    vars:
      - name: ansible_sshnp_daemon_timeout
    env:
      - name: ANSIBLE_SSHNP_DAEMON_TIMEOUT
    ini:
      - section: sshnp_connection
        key: daemon_timeout
  connect_timeout:
    description:
      - Seconds for each TCP+TLS connect of the client to the atDirectory, atServer and relay (client default 10).
      - Not the ssh O(timeout); the plugin raises OpenSSH's C(ConnectTimeout) to O(timeout) plus the whole
        rendezvous budget, so OpenSSH does not give up before the client reports which step failed.
    type: float
    vars:
      - name: ansible_sshnp_connect_timeout
    env:
      - name: ANSIBLE_SSHNP_CONNECT_TIMEOUT
    ini:
      - section: sshnp_connection
        key: connect_timeout
  sshnp_executable:
    description:
      - Path of the C(sshnp) client.
      - When unset, C(sshnp) next to the controller's Python (a virtualenv's C(bin)), then on E(PATH).
    type: path
    vars:
      - name: ansible_sshnp_executable
    env:
      - name: ANSIBLE_SSHNP_EXECUTABLE
    ini:
      - section: sshnp_connection
        key: sshnp_executable
  known_hosts_file:
    description:
      - The per-user known_hosts file the client writes the pinned device host keys into and
        OpenSSH reads (C(UserKnownHostsFile)).
      - Defaults to the client's per-device file C(~/.atsign/sshnp/known_hosts.d/<device atSign>__<device>).
    type: path
    vars:
      - name: ansible_sshnp_known_hosts_file
    env:
      - name: ANSIBLE_SSHNP_KNOWN_HOSTS_FILE
    ini:
      - section: sshnp_connection
        key: known_hosts_file
  host_key_policy:
    description:
      - V(pinned) makes OpenSSH accept only the host keys from the device's signed session response
        (C(StrictHostKeyChecking=yes)).
      - V(accept-new) trusts the first key seen and refuses changes (C(StrictHostKeyChecking=accept-new));
        needed for device daemons that do not pin their host keys (official C(sshnpd)).
    type: string
    choices: [pinned, accept-new]
    default: pinned
    vars:
      - name: ansible_sshnp_host_key_policy
    env:
      - name: ANSIBLE_SSHNP_HOST_KEY_POLICY
    ini:
      - section: sshnp_connection
        key: host_key_policy
  extra_args:
    description:
      - Extra arguments for the C(sshnp) client, split like a shell would (for example V(--ciphers aes-256-ctr)).
    type: string
    vars:
      - name: ansible_sshnp_extra_args
    env:
      - name: ANSIBLE_SSHNP_EXTRA_ARGS
    ini:
      - section: sshnp_connection
        key: extra_args
  failure_hold:
    description:
      - Seconds for which a host whose tunnel failed (the client named the failed step) fails again at once,
        with the same message, instead of making a new rendezvous; V(0) turns it off.
      - Only within the same Ansible run, and only while no tunnel (ControlMaster) is up for the host.
      - Why - Ansible keeps retrying some failures (C(async)/C(poll) retries every poll interval until the
        task's C(async) time is used up; C(wait_for_connection), C(reboot)); a dead relay would make every
        retry wait the whole relay timeout. The first attempt after the hold makes a real rendezvous again;
        after a relay failure in this run (within 10 minutes) it waits 5 s for the relay instead of O(relay_timeout).
      - A retry in the last 10 s of the hold starts that rendezvous in the background (an C(ssh -N) master) and
        still fails at once, so a retry loop never waits for it. If it succeeds, the next retry uses its master;
        if it fails, its failure starts a new hold.
    type: float
    default: 30
    vars:
      - name: ansible_sshnp_failure_hold
    env:
      - name: ANSIBLE_SSHNP_FAILURE_HOLD
    ini:
      - section: sshnp_connection
        key: failure_hold
  sshnp_agent:
    description:
      - Set up the tunnels through the per-user sshnp agent (docs/agent.md) instead of one
        C(sshnp --stdio) process per host; the ProxyCommand becomes C(sshnp-connect), which
        hands OpenSSH the agent's socket (C(ProxyUseFdpass)) and exits.
      - The agent holds one control-plane session per client atSign for every host, lives in
        C(sshnp-agent) under the ssh control path dir (per job under AWX), starts on demand
        and exits when idle.
      - When the agent cannot start (or there is no C(sshnp-connect) beside the client), each
        host falls back to the standalone client with a warning.
      - On by default; V(false) runs one C(sshnp --stdio) per host, as before version 0.2.
    type: boolean
    default: true
    vars:
      - name: ansible_sshnp_agent
    env:
      - name: ANSIBLE_SSHNP_AGENT
    ini:
      - section: sshnp_connection
        key: sshnp_agent
  client_verbosity:
    description:
      - V(0) runs the client with C(-q) (errors only). V(1) keeps its progress lines, V(2) and more add C(-v) flags.
      - Client output goes to the stderr of the first ssh command of each host.
    type: integer
    default: 0
    vars:
      - name: ansible_sshnp_client_verbosity
    env:
      - name: ANSIBLE_SSHNP_CLIENT_VERBOSITY
"""

EXAMPLES = r"""
# inventory.yml
all:
  hosts:
    pi4:
      ansible_connection: noports.sshnp.sshnp
      ansible_user: pi
      ansible_sshnp_client_atsign: "@alice_client"
      ansible_sshnp_device_atsign: "@alice_device"
      ansible_sshnp_device: pi4
      ansible_sshnp_relays: "@rv_eu,@rv_am"
  vars:
    ansible_sshnp_root_domain: root.atsign.org:64
    ansible_pipelining: true

# ansible.cfg (shared settings, and the short name "sshnp"; see docs/ansible-connection.md)
# [defaults]
# connection_plugins = ~/.ansible/collections/ansible_collections/noports/sshnp/plugins/connection
# [sshnp_connection]
# client_atsign = @alice_client
# relays = @rv_eu

# ad hoc
# ansible pi4 -i inventory.yml -m ansible.builtin.ping
"""

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import typing as t

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection.ssh import Connection as SshConnection
from ansible.utils.display import Display
from ansible.utils.path import makedirs_safe, unfrackpath
from ansible_collections.noports.sshnp.plugins.plugin_utils._sshnp_common import (
    DEFAULT_DEVICE,
    SshnpConfigError,
    control_path_name,
    default_known_hosts_path,
    host_key_alias,
    identity_digest,
    norm_atsign,
    relay_list,
)

display = Display()

#: what the client prints for an expected failure (noports/client/progress.py)
_CLIENT_ERROR = re.compile(r"^sshnp: error: (?P<msg>.+?)\s*$", re.MULTILINE)
#: what the client prints for what the user must see even with -q (a pinned host key replaced)
_CLIENT_WARNING = re.compile(r"^sshnp: warning: (?P<msg>.+?)\s*$", re.MULTILINE)
_SAFE_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,252}$")
#: client defaults (noports/client/params.py), for the ConnectTimeout budget only
_CLIENT_RELAY_TIMEOUT = 20.0
_CLIENT_DAEMON_TIMEOUT = 15.0
_CLIENT_CONNECT_TIMEOUT = 10.0
_FALLBACK_CONTROL_PERSIST = "60s"
#: after a relay failure in this run, retries wait this long for a relay (not 20 s) ...
RETRY_RELAY_TIMEOUT_S = 5.0
#: ... for this long after the failure
RETRY_WINDOW_S = 600.0
_RELAY_FAILURE = re.compile(r"^(?:relay: |tunnel: relay connection lost)")
#: a retry in the last PROBE_LEAD_S of a hold starts the next rendezvous in the background
PROBE_LEAD_S = 10.0
#: this worker's background rendezvous (``ssh -N``), by marker path: polled to reap them
_PROBES: dict[str, subprocess.Popen] = {}
#: ``sh -c`` script: $1 is the log file, the rest is the client's argv
_REDIRECT_STDERR = 'f=$1; shift; exec "$@" 2>"$f"'


class SshnpIdentity(t.NamedTuple):
    """Who talks to which device, as whom: everything that keys the tunnel."""

    client_atsign: str
    device_atsign: str
    device: str
    relays: list[str]
    remote_user: str | None
    port: int | None

    @property
    def alias(self) -> str:
        return host_key_alias(self.device_atsign, self.device)

    @property
    def digest(self) -> str:
        return identity_digest(self.client_atsign, self.device_atsign, self.device,
                               self.remote_user, self.port)

    def describe(self) -> str:
        return (f"device {self.device_atsign} {self.device!r} as {self.client_atsign} via "
                f"{','.join(self.relays)}")


def placeholder_host(raw: object) -> str:
    """The host argument given to ssh: the ProxyCommand replaces the TCP connection, so the
    name only appears in logs and ssh_config matching. Names ssh would misparse (``@``,
    ``:``, ``/``, shell metacharacters) become a stable ``sshnp-<hash>``."""
    text = "" if raw is None else str(raw)
    if _SAFE_HOST.match(text):
        return text
    return "sshnp-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def client_failure(stderr: bytes | str) -> str | None:
    """The client's last ``sshnp: error: ...`` line in ssh's stderr (ProxyCommand stderr is
    ssh's), or None when the client reported nothing."""
    found = _CLIENT_ERROR.findall(to_text(stderr, errors="surrogate_or_replace"))
    return found[-1] if found else None


def _control_path(cmd: list[bytes]) -> str | None:
    """The ``ControlPath`` ssh will use (the first ``-o ControlPath=`` wins), or None."""
    for i, arg in enumerate(cmd):
        text = to_text(arg, errors="surrogate_or_replace")
        if text == "-o" and i + 1 < len(cmd):
            text = to_text(cmd[i + 1], errors="surrogate_or_replace")
        elif text.startswith("-o"):
            text = text[2:]
        else:
            continue
        key, sep, value = text.partition("=")
        if sep and key.strip().lower() == "controlpath":
            value = value.strip().strip('"')
            return None if value.lower() == "none" else value
    return None


def _run_started() -> float | None:
    """When this Ansible run began: the start time of the process that forked this worker
    (ansible-playbook, ansible, ansible-runner's), from /proc; None where there is none."""
    try:
        with open(f"/proc/{os.getppid()}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 (starttime), counted after "pid (comm)"
        with open("/proc/stat", encoding="ascii") as fh:
            btime = next(int(ln.split()[1]) for ln in fh if ln.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _probe_running(path: str, pid: int) -> bool:
    """Whether the background ``ssh -N`` of marker ``path`` still runs: this worker's own
    child is polled (and so reaped), another worker's is looked up in /proc (not a zombie)."""
    own = _PROBES.get(path)
    if own is not None and own.pid == pid:
        return own.poll() is None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def client_warnings(text: bytes | str) -> list[str]:
    """The client's ``sshnp: warning: ...`` messages, in order, without repeats."""
    out: list[str] = []
    for msg in _CLIENT_WARNING.findall(to_text(text, errors="surrogate_or_replace")):
        if msg not in out:
            out.append(msg)
    return out


class Connection(SshConnection):
    """ansible.builtin.ssh whose TCP connection is an sshnp tunnel (see the module docstring)."""

    transport = "noports.sshnp.sshnp"
    has_pipelining = True

    # The ssh plugin assigns ``self.host`` from inventory_hostname/ansible_host in __init__,
    # exec_command, put_file, fetch_file and reset, then hands it to ssh: sanitise it there.
    @property  # type: ignore[override]
    def host(self) -> str:
        return placeholder_host(self.__dict__.get("_sshnp_raw_host"))

    @host.setter
    def host(self, value: object) -> None:
        self.__dict__["_sshnp_raw_host"] = value

    # -- options -------------------------------------------------------------------------

    def _opt(self, name: str) -> t.Any:
        try:
            return self.get_option(name)
        except KeyError:
            return None

    def sshnp_identity(self) -> SshnpIdentity:
        """The device identity from the options; AnsibleError naming a missing option."""
        try:
            client = self._opt("client_atsign")
            device_at = self._opt("device_atsign")
            if not client:
                raise SshnpConfigError("client_atsign (ansible_sshnp_client_atsign) is not set")
            if not device_at:
                raise SshnpConfigError("device_atsign (ansible_sshnp_device_atsign) is not set")
            relays = relay_list(self._opt("relays"))
            if not relays:
                raise SshnpConfigError("relays (ansible_sshnp_relays) is not set")
            device = str(self._opt("device") or DEFAULT_DEVICE)
            port = self._opt("port")
            return SshnpIdentity(norm_atsign(client, "client_atsign"),
                                 norm_atsign(device_at, "device_atsign"), device, relays,
                                 self._opt("remote_user") or None,
                                 int(port) if port not in (None, "") else None)
        except SshnpConfigError as exc:
            raise AnsibleError(f"sshnp: {exc} (host {self.__dict__.get('_sshnp_raw_host')})"
                               ) from None

    def sshnp_executable(self) -> str:
        """Option, else next to the controller's Python (venv), else PATH."""
        configured = self._opt("sshnp_executable")
        if configured:
            return os.path.expanduser(str(configured))
        beside = os.path.join(os.path.dirname(sys.executable), "sshnp")
        if os.path.isfile(beside) and os.access(beside, os.X_OK):
            return beside
        found = shutil.which("sshnp")
        if found:
            return found
        raise AnsibleError("sshnp: cannot find the sshnp client next to "
                           f"{sys.executable} or on PATH; install the noports package on the "
                           "controller or set sshnp_executable (ansible_sshnp_executable)")

    def known_hosts_path(self, ident: SshnpIdentity) -> str:
        configured = self._opt("known_hosts_file")
        return (os.path.expanduser(str(configured)) if configured
                else default_known_hosts_path(ident.alias))

    def connect_timeout_budget(self, ident: SshnpIdentity) -> int:
        """OpenSSH ConnectTimeout also bounds the banner exchange, which waits for the whole
        rendezvous: give it the ssh timeout plus every client wait, relays tried in turn."""
        def num(name: str, default: float) -> float:
            value = self._opt(name)
            return float(value) if value not in (None, "") else default
        budget = (num("relay_timeout", _CLIENT_RELAY_TIMEOUT) * len(ident.relays)
                  + num("daemon_timeout", _CLIENT_DAEMON_TIMEOUT)
                  + 2 * num("connect_timeout", _CLIENT_CONNECT_TIMEOUT))
        return int(self._opt("timeout") or 10) + int(budget + 0.999)

    def use_agent(self) -> bool:
        return bool(self._opt("sshnp_agent")) and self.connector_executable() is not None

    def agent_dir(self) -> str:
        """The agent's private directory: in the ssh control path dir, so an AWX job's own
        control dir gives it its own agent."""
        cpdir = unfrackpath(self._opt("control_path_dir") or "~/.ansible/cp")
        return os.path.join(cpdir, "sshnp-agent")

    def connector_executable(self) -> str | None:
        """``sshnp-connect`` next to the sshnp client, else on PATH; None (with a warning:
        the host then gets the standalone ``sshnp --stdio``) when there is none, e.g. an
        older noports install without the agent."""
        client = self.sshnp_executable()
        beside = os.path.join(os.path.dirname(client), "sshnp-connect")
        if os.path.isfile(beside) and os.access(beside, os.X_OK):
            return beside
        found = shutil.which("sshnp-connect")
        if found:
            return found
        display.warning(f"sshnp: sshnp_agent is on but there is no sshnp-connect next to "
                        f"{client} or on PATH; running one sshnp --stdio per host (install "
                        "the noports package of this collection's version on the controller, "
                        "or set ansible_sshnp_agent: false)")
        return None

    def proxy_argv(self, ident: SshnpIdentity) -> list[str]:
        """The client in ProxyCommand mode (flags of noports/client/cli.py), or the agent's
        connector with the same flags (docs/agent.md)."""
        connector = self.connector_executable() if self._opt("sshnp_agent") else None
        head = ([connector, "--agent-dir", self.agent_dir()] if connector
                else [self.sshnp_executable(), "--stdio"])
        argv = [*head, "-f", ident.client_atsign, "-t", ident.device_atsign, "-d", ident.device,
                "-r", ",".join(ident.relays),
                "--root-domain", str(self._opt("root_domain") or "root.atsign.org:64"),
                "--known-hosts", self.known_hosts_path(ident)]
        verbosity = int(self._opt("client_verbosity") or 0)
        if verbosity <= 0:
            argv.append("-q")
        elif verbosity > 1:
            argv.append("-" + "v" * (verbosity - 1))
        for opt, flag in (("keys_file", "-k"), ("ca_file", "--ca-file")):
            value = self._opt(opt)
            if value:
                argv += [flag, os.path.expanduser(str(value))]
        mode = self._opt("tunnel_mode")
        if mode:
            argv += ["--tunnel-mode", str(mode)]
            if mode == "ssh" and ident.remote_user:
                argv += ["-u", ident.remote_user]
        timeouts = {opt: self._opt(opt) for opt in
                    ("relay_timeout", "daemon_timeout", "connect_timeout")}
        recent = self.failure_in_this_run(ident, RETRY_WINDOW_S)
        if recent is not None and _RELAY_FAILURE.match(recent[0]):
            # the relay failed minutes ago in this run (async/poll, wait_for_connection
            # retries): a live relay answers in well under a second, a dead one would make
            # each retry wait the whole relay timeout
            configured = timeouts["relay_timeout"]
            timeouts["relay_timeout"] = min(
                float(configured) if configured not in (None, "") else _CLIENT_RELAY_TIMEOUT,
                RETRY_RELAY_TIMEOUT_S)
        for opt, value in timeouts.items():
            if value not in (None, ""):
                argv += ["--" + opt.replace("_", "-"), f"{float(value):g}"]
        if ident.port is not None:
            argv += ["--remote-sshd-port", str(ident.port)]
        extra = self._opt("extra_args")
        if extra:
            argv += shlex.split(str(extra))
        return argv

    def client_log_path(self, ident: SshnpIdentity) -> str:
        """Per-identity file holding the stderr of the last client run for this tunnel."""
        cpdir = unfrackpath(self._opt("control_path_dir") or "~/.ansible/cp")
        return os.path.join(cpdir, control_path_name(ident.digest) + ".log")

    def proxy_command(self, ident: SshnpIdentity) -> str:
        """One shell command line; ``%`` doubled because OpenSSH expands ``%h``-style tokens.

        With ControlPersist, OpenSSH points the ProxyCommand's stderr at /dev/null, so the
        client's one-line error would be lost: a ``/bin/sh`` wrapper sends it to
        :meth:`client_log_path` instead (the user's login shell, which OpenSSH runs the
        ProxyCommand with, may not be a POSIX shell; ``/bin/sh`` always is).
        """
        argv = ["/bin/sh", "-c", _REDIRECT_STDERR, "sshnp-proxy", self.client_log_path(ident),
                *self.proxy_argv(ident)]
        return shlex.join(argv).replace("%", "%%")

    def control_path_template(self, ident: SshnpIdentity) -> str:
        return "%(directory)s/" + control_path_name(ident.digest)

    # -- command line --------------------------------------------------------------------

    def sshnp_args(self, ident: SshnpIdentity, *, control_only: bool = False) -> list[str]:
        """Options placed right after the ssh/sftp/scp binary, where they win: OpenSSH keeps
        the first value it sees for each option."""
        args: list[str] = []
        if not control_only:
            args += ["-o", "ProxyCommand=" + self.proxy_command(ident)]
            if self.use_agent():
                args += ["-o", "ProxyUseFdpass=yes"]
        known = self.known_hosts_path(ident)
        policy = self._opt("host_key_policy") or "pinned"
        args += ["-o", f"HostKeyAlias={ident.alias}",
                 "-o", f'UserKnownHostsFile="{known}"',
                 "-o", "StrictHostKeyChecking=" + ("yes" if policy == "pinned" else "accept-new"),
                 "-o", f"ConnectTimeout={self.connect_timeout_budget(ident)}"]
        return args

    def _build_command(self, binary: str, subsystem: str, *other_args: bytes | str) -> list[bytes]:
        ident = self.sshnp_identity()
        control_only = any(to_bytes(a) == b"-O" for a in other_args)
        # Our ControlPath becomes the ssh plugin's default; a user-set control_path still wins.
        if not self._opt("control_path"):
            self.set_option("control_path", self.control_path_template(ident))
        b_command = super()._build_command(binary, subsystem, *other_args)

        extra = self.sshnp_args(ident, control_only=control_only)
        makedirs_safe(os.path.dirname(self.known_hosts_path(ident)), 0o700)
        persist, path = self._persistence_controls(b_command)
        if not persist:
            # ssh_args without ControlPersist would mean a rendezvous per ssh command.
            cpdir = unfrackpath(self._opt("control_path_dir") or "~/.ansible/cp")
            makedirs_safe(cpdir, 0o700)
            extra += ["-o", "ControlMaster=auto",
                      "-o", f"ControlPersist={_FALLBACK_CONTROL_PERSIST}"]
            if not path:
                template = self._opt("control_path") or self.control_path_template(ident)
                extra += ["-o", 'ControlPath="%s"' % (template % {"directory": cpdir})]
            self._persistent = True
        at = b_command.index(to_bytes(binary, errors="surrogate_or_strict"))
        b_extra = [to_bytes(a, errors="surrogate_or_strict") for a in extra]
        display.vvvvv(f"SSH: sshnp tunnel for {ident.describe()}: ({')('.join(extra)})",
                      host=self.host)
        b_command[at + 1:at + 1] = b_extra
        return b_command

    # -- failures ------------------------------------------------------------------------

    def _run(self, cmd: list[bytes], in_data: bytes | None, sudoable: bool = True,
             checkrc: bool = True) -> tuple[int, bytes, bytes]:
        # the hold is checked before ssh.py's reconnection_retries: a held failure would
        # only be held again after each of its pauses
        held = self.held_failure(cmd)
        if held:
            raise AnsibleConnectionFailure(held)
        return super()._run(cmd, in_data, sudoable=sudoable, checkrc=checkrc)

    def reset(self) -> None:
        """ssh.py's reset asks the master to stop (``ssh -O check``, then ``-O stop``); with no
        master socket there is nothing to ask, and an ``async`` poll loop calls reset() after
        every failed retry: skip the ssh process then."""
        self.host = self.get_option("host") or self._play_context.remote_addr
        try:
            control = _control_path(self._build_command(
                self.get_option("ssh_executable"), "ssh", "-O", "check", self.host))
        except AnsibleError:
            control = None
        if control is not None and "%" not in control and not os.path.exists(control):
            display.vvv("SSH: sshnp: no master socket; nothing to reset", host=self.host)
            self.close()
            return
        super().reset()

    def _bare_run(self, cmd: list[bytes], in_data: bytes | None, sudoable: bool = True,
                  checkrc: bool = True) -> tuple[int, bytes, bytes]:
        held = self.held_failure(cmd)  # again here for sftp/scp, which do not pass _run
        if held:
            raise AnsibleConnectionFailure(held)
        started = time.time()
        try:
            rc, b_out, b_err = super()._bare_run(cmd, in_data, sudoable=sudoable,
                                                 checkrc=checkrc)
        except AnsibleConnectionFailure as exc:
            self.surface_client_warnings()
            # With pipelining (in_data), ssh.py raises its own generic "Data could not be
            # sent" on exit 255 before returning: name the tunnel's failed step instead.
            message = self.failure_message(to_text(exc), self.client_log_since(started))
            if message:
                raise AnsibleConnectionFailure(message) from None  # not ssh.py's generic text
            raise
        self.surface_client_warnings()
        if rc == 255:
            message = self.failure_message(b_err, self.client_log_since(started))
            if message:
                raise AnsibleConnectionFailure(message)
        return rc, b_out, b_err

    def failure_in_this_run(self, ident: SshnpIdentity, within: float
                            ) -> tuple[str, float] | None:
        """(the client's error, its age in s) if this host's last client run failed less
        than ``within`` s ago during this Ansible run, else None."""
        try:
            path = self.client_log_path(ident)
            mtime = os.stat(path).st_mtime
        except OSError:
            return None
        age = time.time() - mtime
        run_start = _run_started()
        if not 0 <= age < within or run_start is None or mtime < run_start:
            return None
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                step = client_failure(fh.read(65536))
        except OSError:
            return None
        return (step, age) if step else None

    def held_failure(self, cmd: list[bytes]) -> str | None:
        """The failure to repeat at once instead of a new rendezvous (see ``failure_hold``):
        the client log of this host says the last tunnel failed (its ``sshnp: error:``
        line) less than ``failure_hold`` seconds ago, during this Ansible run, and no
        ControlMaster is up; or a background rendezvous for it is still under way. Else None.

        In the last :data:`PROBE_LEAD_S` of the hold, the retry also starts that rendezvous in
        the background (:meth:`start_probe`): a retry loop (``async``/``poll``,
        ``wait_for_connection``) then never waits for it, and finds its master (or its fresh
        failure, a new hold) on a later retry."""
        try:
            hold = float(self._opt("failure_hold") or 0)
        except (TypeError, ValueError):
            hold = 0.0
        if hold <= 0 or any(to_bytes(a) == b"-O" for a in cmd):
            return None
        control = _control_path(cmd)
        if control is None or "%" in control or os.path.exists(control):
            return None  # a live master (or one we cannot see: ssh's %-tokens) may carry it
        try:
            ident = self.sshnp_identity()
        except AnsibleError:
            return None
        probing = self.probe_under_way(ident)
        if probing is not None:
            step, age = probing
            display.vvv(f"SSH: sshnp: the tunnel failed {age:.1f}s ago; a rendezvous is under "
                        "way in the background", host=self.host)
            return (f"sshnp: {step} [{ident.describe()}] (failed {age:.0f}s ago in this run; "
                    "a new rendezvous is under way in the background: failure_hold)")
        found = self.failure_in_this_run(ident, hold)
        if found is None:
            return None
        step, age = found
        display.vvv(f"SSH: sshnp: the tunnel failed {age:.1f}s ago; not retried before "
                    f"failure_hold ({hold:g}s)", host=self.host)
        if age >= hold - PROBE_LEAD_S:
            self.start_probe(ident, step, time.time() - age)
        return (f"sshnp: {step} [{ident.describe()}] (failed {age:.0f}s ago in this run; a "
                f"new rendezvous is tried {hold:g}s after the failure: failure_hold)")

    def probe_path(self, ident: SshnpIdentity) -> str:
        """Marker of a background rendezvous: its pid, start, and the failure it retries."""
        return self.client_log_path(ident) + ".probe"

    def probe_under_way(self, ident: SshnpIdentity) -> tuple[str, float] | None:
        """(the failure being retried, its age) while a background rendezvous for this host
        runs (its ProxyCommand has emptied the client log meanwhile), else None (and the
        marker of a finished one is removed: the log or the master socket tells how it went)."""
        path = self.probe_path(ident)
        try:
            with open(path, encoding="utf-8") as fh:
                probe = json.load(fh)
            pid, started = int(probe["pid"]), float(probe["started"])
            step, failed = str(probe["step"]), float(probe["failed"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        now = time.time()
        if _probe_running(path, pid) and 0 <= now - started < self.connect_timeout_budget(ident):
            run_start = _run_started()
            if run_start is not None and started >= run_start:
                return step, now - failed
            return None  # a previous run's: a new run never inherits a hold
        _PROBES.pop(path, None)
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None

    def start_probe(self, ident: SshnpIdentity, step: str, failed: float) -> None:
        """Start ``ssh -N`` with this host's tunnel options in the background: with
        ControlPersist it returns once authenticated and leaves a master the next retry uses;
        through a dead relay its client writes a fresh failure (a new hold). Not with a
        password (sshpass needs a pipe per ssh run): the attempt after the hold then makes the
        rendezvous itself, as without probes."""
        if self._opt("password") or self._play_context.password:
            return
        path = self.probe_path(ident)
        try:
            cmd = self._build_command(self.get_option("ssh_executable"), "ssh", "-N", self.host)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except (OSError, AnsibleError):
            return  # another worker's probe marker, or no way to build the command
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            display.vvv(f"SSH: sshnp: cannot start a background rendezvous: {exc}",
                        host=self.host)
            return
        _PROBES[path] = proc
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"pid": proc.pid, "started": time.time(), "step": step,
                       "failed": failed}, fh)
        display.vvv(f"SSH: sshnp: background rendezvous started (ssh pid {proc.pid})",
                    host=self.host)

    def surface_client_warnings(self) -> list[str]:
        """Show the client's warnings (host key rotation) as Ansible warnings, once per client
        run: the client's stderr goes to :meth:`client_log_path` (ControlPersist sends it to
        /dev/null otherwise), and a ``.shown`` file next to it records which version of the
        log (mtime, size) was already shown, so later tasks on the same master, in other
        worker processes, do not repeat it."""
        try:
            path = self.client_log_path(self.sshnp_identity())
            st = os.stat(path)
        except (OSError, AnsibleError):
            return []
        version = f"{st.st_mtime_ns} {st.st_size}"
        marker = path + ".shown"
        try:
            with open(marker, encoding="utf-8") as fh:
                if fh.read().strip() == version:
                    return []
        except OSError:
            pass
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                warnings = client_warnings(fh.read(65536))
            with open(marker, "w", encoding="utf-8") as fh:
                fh.write(version + "\n")
        except OSError:
            return []
        host = self.__dict__.get("_sshnp_raw_host")
        for msg in warnings:
            display.warning(f"sshnp: {msg} (host {host})")
        return warnings

    def client_log_since(self, started: float) -> str:
        """The client's stderr if a client ran for this tunnel since ``started``, else ''."""
        try:
            path = self.client_log_path(self.sshnp_identity())
            if os.stat(path).st_mtime < started - 1:
                return ""
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.read(65536)
        except (OSError, AnsibleError):
            return ""

    def failure_message(self, stderr: bytes | str, client_log: str = "") -> str | None:
        """UNREACHABLE text for an ssh exit 255 caused by the tunnel, else None (ssh's own
        handling then applies: remote exit 255, auth failures, ...)."""
        text = to_text(stderr, errors="surrogate_or_replace")
        try:
            ident: SshnpIdentity | None = self.sshnp_identity()
        except AnsibleError:
            ident = None
        where = f" [{ident.describe()}]" if ident else ""
        step = client_failure(client_log) or client_failure(text)
        if step:
            return f"sshnp: {step}{where}"
        if re.search(r"sshnp\S*: (?:command )?not found|exec: .*sshnp.*: (?:not found|No such file)",
                     client_log + text):
            return ("sshnp: could not run the sshnp client (set sshnp_executable)"
                    f"{where}: {(client_log or text).strip()}")
        if "during banner exchange" in text or "kex_exchange_identification" in text:
            log = self.client_log_path(ident) if ident else "the client log"
            return ("sshnp: the tunnel closed or timed out before the device's sshd answered "
                    f"(the client reported no error; see {log}, or rerun with "
                    f"ansible_sshnp_client_verbosity=2){where}: {text.strip()}")
        if "Host key verification failed" in text:
            return ("sshnp: host key verification failed: the device's sshd key is not the one "
                    "pinned by its signed session response (or the daemon pins none: set "
                    f"host_key_policy=accept-new){where}: {text.strip()}")
        return None
