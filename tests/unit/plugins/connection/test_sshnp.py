"""Unit tests of the noports.sshnp.sshnp connection plugin: the ssh argv it builds, the
identity keying of ControlPath/HostKeyAlias, option sources and failure mapping.

Plugins are loaded through Ansible's own loader (as ansible-test and amazon.aws's aws_ssm
tests do), so DOCUMENTATION, the doc fragments and option resolution are exercised too.
"""

from __future__ import annotations

import ast
import os
import shlex
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.playbook.play_context import PlayContext
from ansible.plugins.connection import ssh as ssh_mod
from ansible.plugins.loader import connection_loader
from ansible_collections.noports.sshnp.plugins.connection import sshnp as plugin

BASE_VARS = {
    "ansible_sshnp_client_atsign": "@Alice_Client",
    "ansible_sshnp_device_atsign": "alice_device",
    "ansible_sshnp_device": "pi4",
    "ansible_sshnp_relays": "@rv_eu, @rv_am",
    "ansible_sshnp_keys_file": "/keys/@alice_client_key.atKeys",
    "ansible_sshnp_root_domain": "127.0.0.1:6464",
    "ansible_sshnp_executable": "/opt/np/bin/sshnp",
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No ANSIBLE_SSHNP_* from the developer's shell; control sockets and known_hosts in tmp."""
    for name in list(os.environ):
        if name.startswith("ANSIBLE_SSHNP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ANSIBLE_SSH_CONTROL_PATH_DIR", str(tmp_path / "cp"))
    # no sshnp-connect on PATH unless a test puts one next to its sshnp (test_sshnp_agent.py)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")


def make_conn(inventory_hostname: str = "pi4.alice_device", **overrides):
    pc = PlayContext()
    pc.remote_addr = inventory_hostname
    conn = connection_loader.get("noports.sshnp.sshnp", pc, "/dev/null")
    var_options = dict(BASE_VARS, inventory_hostname=inventory_hostname)
    var_options.update(overrides)
    conn.set_options(var_options={k: v for k, v in var_options.items() if v is not None})
    conn.host = inventory_hostname
    return conn


def opts_of(argv: list[bytes]) -> dict[str, str]:
    """``-o Key=Value`` pairs, first one wins (as in OpenSSH)."""
    out: dict[str, str] = {}
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == b"-o":
            key, _sep, val = value.decode().partition("=")
            out.setdefault(key.lower(), val)
    return out


def build(conn, *args: str) -> list[bytes]:
    return conn._build_command("ssh", "ssh", conn.host, *args)


def client_argv(proxycommand: str) -> list[str]:
    """The sshnp argv inside ``/bin/sh -c <redirect> sshnp-proxy <log> sshnp ...``."""
    words = shlex.split(proxycommand.replace("%%", "%"))
    assert words[:2] == ["/bin/sh", "-c"] and words[3] == "sshnp-proxy"
    assert words[4].endswith(".log")
    return words[5:]


# -- loading and documentation --------------------------------------------------------------

def test_loads_by_fqcn_and_is_an_ssh_connection():
    conn = make_conn()
    assert isinstance(conn, ssh_mod.Connection)
    assert conn.has_pipelining
    assert conn.transport == "noports.sshnp.sshnp"


def test_every_option_of_the_installed_ssh_plugin_is_declared():
    """The ssh plugin's code calls get_option() on its options: a missing one is a KeyError.
    Fails when a newer ansible-core adds ssh options: re-sync plugins/doc_fragments/sshnp.py."""
    tree = ast.parse(Path(ssh_mod.__file__).read_text())
    doc = next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
               and getattr(n.targets[0], "id", "") == "DOCUMENTATION")
    ssh_options = set(yaml.safe_load(doc)["options"])
    conn = make_conn()
    for name in sorted(ssh_options):
        conn.get_option(name)  # raises if undeclared


def test_ssh_options_keep_their_ssh_sources(monkeypatch):
    monkeypatch.setenv("ANSIBLE_SSH_ARGS", "-o ControlMaster=auto -o ControlPersist=300s")
    conn = make_conn(ansible_ssh_common_args="-o ServerAliveInterval=5",
                     ansible_pipelining=True, ansible_user="pi")
    assert conn.get_option("ssh_args").endswith("ControlPersist=300s")
    assert conn.get_option("ssh_common_args") == "-o ServerAliveInterval=5"
    assert conn.get_option("pipelining") is True
    argv = build(conn, "true")
    o = opts_of(argv)
    assert o["controlpersist"] == "300s"
    assert o["serveraliveinterval"] == "5"
    assert o["user"] == '"pi"'


# -- the injected ssh options -------------------------------------------------------------

def test_argv_has_proxycommand_with_client_flags():
    """The standalone path (``ansible_sshnp_agent: false``); the agent's connector takes the
    same flags (test_sshnp_agent.py)."""
    conn = make_conn(ansible_sshnp_ca_file="/plane/ca.pem", ansible_sshnp_tunnel_mode="aes",
                     ansible_sshnp_relay_timeout="7", ansible_sshnp_daemon_timeout=9.5,
                     ansible_sshnp_agent=False)
    argv = build(conn, "echo hi")
    assert argv[0] == b"ssh"
    # ours come right after the binary, so they win over anything later (first value wins)
    assert argv[1:3] == [b"-o", argv[2]] and argv[2].startswith(b"ProxyCommand=")
    proxy = client_argv(opts_of(argv)["proxycommand"])
    assert proxy[:2] == ["/opt/np/bin/sshnp", "--stdio"]
    flags = dict(zip(proxy, proxy[1:], strict=False))
    assert flags["-f"] == "@alice_client"
    assert flags["-t"] == "@alice_device"
    assert flags["-d"] == "pi4"
    assert flags["-r"] == "@rv_eu,@rv_am"
    assert flags["-k"] == "/keys/@alice_client_key.atKeys"
    assert flags["--root-domain"] == "127.0.0.1:6464"
    assert flags["--ca-file"] == "/plane/ca.pem"
    assert flags["--tunnel-mode"] == "aes"
    assert flags["--relay-timeout"] == "7"
    assert flags["--daemon-timeout"] == "9.5"
    assert "-q" in proxy
    assert flags["--known-hosts"].endswith("/.atsign/sshnp/known_hosts.d/alice_device__pi4")
    # the host and the remote command stay last
    assert argv[-2:] == [b"pi4.alice_device", b"echo hi"]


def test_host_key_pinning_options():
    conn = make_conn()
    o = opts_of(build(conn, "true"))
    assert o["hostkeyalias"] == "alice_device/pi4"
    assert o["stricthostkeychecking"] == "yes"
    kh = o["userknownhostsfile"].strip('"')
    proxy = client_argv(o["proxycommand"])
    assert kh == proxy[proxy.index("--known-hosts") + 1]
    assert Path(kh).parent.is_dir()  # created 0700 so accept-new can write there


def test_host_key_checking_false_does_not_weaken_pinning():
    conn = make_conn(ansible_host_key_checking=False)
    assert opts_of(build(conn, "true"))["stricthostkeychecking"] == "yes"


def test_accept_new_policy():
    conn = make_conn(ansible_sshnp_host_key_policy="accept-new")
    assert opts_of(build(conn, "true"))["stricthostkeychecking"] == "accept-new"


def test_alias_and_known_hosts_match_the_client():
    knownhosts = pytest.importorskip("noports.client.knownhosts")
    for at, dev in [("@alice_device", "pi4"), ("@Bob.Dev", "x_y-z"), ("@c", "we*ird")]:
        assert plugin.host_key_alias(at, dev) == knownhosts.host_key_alias(at, dev)
        alias = knownhosts.host_key_alias(at, dev)
        assert plugin.default_known_hosts_path(alias) == str(
            knownhosts.device_known_hosts_path(Path.home() / ".atsign" / "sshnp", alias))


def test_control_path_is_identity_keyed_stable_and_short(tmp_path):
    path = opts_of(build(make_conn(), "true"))["controlpath"].strip('"')
    assert path == opts_of(build(make_conn("other-name"), "true"))["controlpath"].strip('"')
    assert Path(path).parent == tmp_path / "cp"
    assert len(Path(path).name) <= 15
    # the ControlPersist master's socket path must fit sun_path (104 bytes on BSD/macOS) with
    # OpenSSH's 17-char temporary suffix, under the default control_path_dir of a user with a
    # 16-character name (tmp_path and HOME here are long under xdist: .../popen-gw1/...)
    default = os.path.join("/home/" + "u" * 16 + "/.ansible/cp", Path(path).name)
    assert len(default) + 17 < 104
    others = [make_conn(ansible_sshnp_device="pi5"),
              make_conn(ansible_sshnp_device_atsign="@bob_device"),
              make_conn(ansible_sshnp_client_atsign="@carol"),
              make_conn(ansible_user="root"),
              make_conn(ansible_port=2222)]
    paths = {opts_of(build(c, "true"))["controlpath"] for c in others}
    assert len(paths) == len(others) and f'"{path}"' not in paths


def test_user_control_path_wins():
    conn = make_conn(ansible_control_path="%(directory)s/mine")
    assert opts_of(build(conn, "true"))["controlpath"].endswith('/mine"')


def test_controlpersist_added_when_ssh_args_drop_it(monkeypatch):
    monkeypatch.setenv("ANSIBLE_SSH_ARGS", "-C")
    conn = make_conn()
    o = opts_of(build(conn, "true"))
    assert o["controlmaster"] == "auto"
    assert o["controlpersist"] == "60s"
    assert "/np-" in o["controlpath"]
    assert conn._persistent


def test_sftp_and_scp_get_the_same_tunnel():
    conn = make_conn()
    ssh_o = opts_of(build(conn, "true"))
    for sub in ("sftp", "scp"):
        o = opts_of(conn._build_command(sub, sub, "x"))
        for key in ("proxycommand", "hostkeyalias", "controlpath", "userknownhostsfile"):
            assert o[key] == ssh_o[key], (sub, key)


def test_control_commands_skip_the_proxy(monkeypatch):
    monkeypatch.setattr(plugin.shutil, "which", lambda _: None)
    conn = make_conn(ansible_sshnp_executable=None)
    monkeypatch.setattr(plugin.sys, "executable", "/nonexistent/python")
    o = opts_of(conn._build_command("ssh", "ssh", "-O", "stop", conn.host))
    assert "proxycommand" not in o and "controlpath" in o
    with pytest.raises(AnsibleError, match="cannot find the sshnp client"):
        build(conn, "true")


def test_executable_next_to_python_then_path(monkeypatch, tmp_path):
    exe = tmp_path / "venv" / "bin" / "sshnp"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setattr(plugin.sys, "executable", str(exe.parent / "python"))
    conn = make_conn(ansible_sshnp_executable=None)
    assert conn.sshnp_executable() == str(exe)
    monkeypatch.setattr(plugin.sys, "executable", "/nonexistent/python")
    monkeypatch.setattr(plugin.shutil, "which", lambda name: f"/usr/local/bin/{name}")
    assert conn.sshnp_executable() == "/usr/local/bin/sshnp"


def test_proxycommand_quoting_and_percent_escaping():
    conn = make_conn(ansible_sshnp_keys_file="/my keys/50%/@a_key.atKeys",
                     ansible_sshnp_extra_args="--ciphers 'aes-256-ctr'")
    raw = opts_of(build(conn, "true"))["proxycommand"]
    assert "%%" in raw and "50%/" not in raw.replace("%%", "")
    proxy = client_argv(raw)  # what OpenSSH hands to the shell
    assert proxy[proxy.index("-k") + 1] == "/my keys/50%/@a_key.atKeys"
    assert proxy[-2:] == ["--ciphers", "aes-256-ctr"]


def test_port_and_user_map_to_the_client_in_ssh_mode():
    conn = make_conn(ansible_port=2222, ansible_user="pi", ansible_sshnp_tunnel_mode="ssh")
    proxy = client_argv(opts_of(build(conn, "true"))["proxycommand"])
    assert proxy[proxy.index("--remote-sshd-port") + 1] == "2222"
    assert proxy[proxy.index("-u") + 1] == "pi"


def test_connect_timeout_covers_the_rendezvous():
    conn = make_conn(ansible_ssh_timeout=10, ansible_sshnp_relay_timeout=20,
                     ansible_sshnp_daemon_timeout=15, ansible_sshnp_connect_timeout=5)
    # 10 + 2 relays * 20 + 15 + 2 * 5; placed first, so ssh's own ConnectTimeout=10 loses
    assert opts_of(build(conn, "true"))["connecttimeout"] == "75"


def test_client_verbosity():
    proxy = client_argv(opts_of(build(make_conn(ansible_sshnp_client_verbosity=3),
                                      "true"))["proxycommand"])
    assert "-q" not in proxy and "-vv" in proxy


@pytest.mark.parametrize("raw,expected", [
    ("pi4.alice_device", "pi4.alice_device"),
    ("10.0.0.5", "10.0.0.5"),
])
def test_placeholder_host_keeps_plain_names(raw, expected):
    assert plugin.placeholder_host(raw) == expected


@pytest.mark.parametrize("raw", ["pi4@alice_device", "@alice/pi4", "a b", "-oProxyCommand=x",
                                 "fe80::1", "x;rm"])
def test_placeholder_host_replaces_names_ssh_would_misparse(raw):
    host = plugin.placeholder_host(raw)
    assert host.startswith("sshnp-") and host == plugin.placeholder_host(raw)


def test_options_from_environment(monkeypatch):
    monkeypatch.setenv("ANSIBLE_SSHNP_CLIENT_ATSIGN", "@env_client")
    monkeypatch.setenv("ANSIBLE_SSHNP_RELAYS", "@rv_env")
    monkeypatch.setenv("ANSIBLE_SSHNP_TUNNEL_MODE", "ssh")
    conn = make_conn(ansible_sshnp_client_atsign=None, ansible_sshnp_relays=None)
    proxy = client_argv(opts_of(build(conn, "true"))["proxycommand"])
    flags = dict(zip(proxy, proxy[1:], strict=False))
    assert flags["-f"] == "@env_client"
    assert flags["-r"] == "@rv_env"
    assert flags["--tunnel-mode"] == "ssh"


def test_vars_win_over_environment(monkeypatch):
    monkeypatch.setenv("ANSIBLE_SSHNP_DEVICE", "from_env")
    conn = make_conn()
    assert conn.sshnp_identity().device == "pi4"


def test_missing_option_is_named():
    conn = make_conn(ansible_sshnp_device_atsign=None)
    with pytest.raises(AnsibleError, match="device_atsign"):
        build(conn, "true")


# -- failures -----------------------------------------------------------------------------

RELAY_DOWN = (b"sshnp [ 0.101s] asking relay @rv_eu for ports\n"
              b"sshnp: error: relay: @rv_eu did not answer within 20s (step 2: request_ports)"
              b" (is srvd running?)\n"
              b"kex_exchange_identification: Connection closed by remote host\n"
              b"Connection closed by UNKNOWN port 65535\n")


def _fake_bare_run(result):
    calls = []

    def fake(self, cmd, in_data, sudoable=True, checkrc=True):
        calls.append(cmd)
        return result
    return fake, calls


def test_client_failure_becomes_unreachable_with_the_step(monkeypatch):
    fake, calls = _fake_bare_run((255, b"", RELAY_DOWN))
    monkeypatch.setattr(ssh_mod.Connection, "_bare_run", fake)
    conn = make_conn(ansible_ssh_retries=1)
    monkeypatch.setattr(ssh_mod.time, "sleep", lambda _: None)
    with pytest.raises(AnsibleConnectionFailure) as err:
        conn.exec_command("true")
    msg = str(err.value)
    assert msg.startswith("sshnp: relay: @rv_eu did not answer within 20s (step 2: request_ports)")
    assert "@alice_device" in msg and "'pi4'" in msg
    assert len(calls) == 2  # reconnection_retries still applies


@pytest.mark.parametrize("stderr,needle", [
    (b"sshnp: error: device: @alice_device did not answer within 15s\n", "device: @alice_device"),
    (b"sshnp: error: verify: signature invalid on the session response\n", "signature invalid"),
    (b"sshnp: error: atServer: not authorized\n", "not authorized"),
    (b"sh: 1: exec: /opt/np/bin/sshnp: not found\n", "could not run the sshnp client"),
    (b"Connection timed out during banner exchange\n", "tunnel closed or timed out"),
    (b"No ED25519 host key is known for alice_device/pi4 and you have requested strict "
     b"checking.\nHost key verification failed.\n", "host_key_policy=accept-new"),
])
def test_failure_messages(stderr, needle):
    msg = make_conn().failure_message(stderr)
    assert msg is not None and needle in msg


def test_remote_exit_255_is_not_a_tunnel_failure(monkeypatch):
    assert make_conn().failure_message(b"") is None
    fake, _calls = _fake_bare_run((255, b"", b"Permission denied (publickey).\n"))
    monkeypatch.setattr(ssh_mod.Connection, "_bare_run", fake)
    with pytest.raises(AnsibleConnectionFailure, match="Failed to connect to the host via ssh"):
        make_conn().exec_command("true")


def test_success_passes_through(monkeypatch):
    fake, calls = _fake_bare_run((0, b"hi\n", b""))
    monkeypatch.setattr(ssh_mod.Connection, "_bare_run", fake)
    conn = make_conn()
    assert conn.exec_command("echo hi")[:2] == (0, b"hi\n")
    assert b"ProxyCommand" in b" ".join(calls[0])


def test_client_error_is_read_from_the_log_file(monkeypatch):
    """With ControlPersist OpenSSH sends the ProxyCommand's stderr to /dev/null; the wrapper
    writes it to a per-identity log file instead, which the plugin reads on exit 255."""
    conn = make_conn()
    log = Path(conn.client_log_path(conn.sshnp_identity()))
    assert log.name.startswith("np-") and log.parent == Path(conn.get_option(
        "control_path_dir")).expanduser()

    def fake(self, cmd, in_data, sudoable=True, checkrc=True):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("sshnp: error: device: @alice_device did not answer within 15s "
                       "(step 5: ssh_request)\n")
        return 255, b"", b"kex_exchange_identification: Connection closed by remote host\n"
    monkeypatch.setattr(ssh_mod.Connection, "_bare_run", fake)
    with pytest.raises(AnsibleConnectionFailure, match=r"^sshnp: device: @alice_device did "
                       r"not answer within 15s \(step 5: ssh_request\)"):
        conn.exec_command("true")


def test_a_stale_log_file_is_ignored(monkeypatch):
    conn = make_conn()
    log = Path(conn.client_log_path(conn.sshnp_identity()))
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("sshnp: error: relay: old failure\n")
    os.utime(log, (1, 1))
    assert conn.client_log_since(10**9) == ""


def test_client_warnings_parsed_in_order_without_repeats():
    text = ("sshnp [ 0.1s] tunnel ready\nsshnp: warning: host key of a/b changed: was X; now Y\n"
            "sshnp: error: boom\nsshnp: warning: second\nsshnp: warning: host key of a/b "
            "changed: was X; now Y\n")
    assert plugin.client_warnings(text) == ["host key of a/b changed: was X; now Y", "second"]
    assert plugin.client_warnings(b"") == []


def test_client_warnings_shown_once_per_client_run(monkeypatch):
    conn = make_conn()
    shown: list[str] = []
    monkeypatch.setattr(plugin.display, "warning", shown.append)
    log = Path(conn.client_log_path(conn.sshnp_identity()))
    assert conn.surface_client_warnings() == []  # no client ran yet: no log
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("sshnp: warning: host key of alice_device/pi4 changed: was A; now B\n")
    assert conn.surface_client_warnings() == ["host key of alice_device/pi4 changed: was A; now B"]
    assert shown == ["sshnp: host key of alice_device/pi4 changed: was A; now B "
                     "(host pi4.alice_device)"]
    assert conn.surface_client_warnings() == []  # the next task on the same master: silent
    assert make_conn().surface_client_warnings() == []  # ... also from another worker
    log.write_text("sshnp: warning: host key of alice_device/pi4 changed: was B; now C\n")
    os.utime(log, ns=(1, 1))  # a new client run (new log version)
    assert conn.surface_client_warnings() == ["host key of alice_device/pi4 changed: was B; now C"]
    assert len(shown) == 2


# -- failure_hold: a failed tunnel fails again at once within the run (issue 15) ----------------

def _held_setup(monkeypatch, *, run_started: float, log_text: str = "sshnp: error: tunnel: "
                "relay connection lost: the stream from relay @rv_eu (h:1) ended\n", **opts):
    conn = make_conn(**opts)
    log = Path(conn.client_log_path(conn.sshnp_identity()))
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(log_text)
    monkeypatch.setattr(plugin, "_run_started", lambda: run_started)
    fake, calls = _fake_bare_run((0, b"ok\n", b""))
    monkeypatch.setattr(ssh_mod.Connection, "_bare_run", fake)
    return conn, calls


def test_a_failure_in_this_run_is_held(monkeypatch):
    """async/poll retries through a dead relay: each would wait the whole relay timeout."""
    import time
    conn, calls = _held_setup(monkeypatch, run_started=time.time() - 60)
    with pytest.raises(AnsibleConnectionFailure) as err:
        conn.exec_command("true")
    assert calls == []  # no ssh, no rendezvous
    msg = str(err.value)
    assert msg.startswith("sshnp: tunnel: relay connection lost: the stream from relay @rv_eu")
    assert msg.endswith("(failed 0s ago in this run; a new rendezvous is tried 30s after the "
                        "failure: failure_hold)")


@pytest.mark.parametrize("case", ["previous run", "hold off", "master up", "no error", "old"])
def test_a_failure_is_not_held(monkeypatch, case):
    import time
    now = time.time()
    conn, calls = _held_setup(
        monkeypatch, run_started=now + 5 if case == "previous run" else now - 60,
        log_text="sshnp [ 0.1s] tunnel ready\n" if case == "no error" else
        "sshnp: error: relay: x\n", **({"ansible_sshnp_failure_hold": 0}
                                       if case == "hold off" else {}))
    if case == "master up":
        sock = Path(plugin._control_path(build(conn, "true")))
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.write_text("")
    if case == "old":
        log = Path(conn.client_log_path(conn.sshnp_identity()))
        os.utime(log, (now - 31, now - 31))
    assert conn.exec_command("true")[:2] == (0, b"ok\n")
    assert len(calls) == 1


def test_control_path_and_run_start_helpers():
    import time
    assert plugin._control_path([b"ssh", b"-o", b'ControlPath="/a b/c"', b"-o",
                                 b"ControlPath=/second"]) == "/a b/c"
    assert plugin._control_path([b"ssh", b"-oControlPath=none"]) is None
    assert plugin._control_path([b"ssh", b"host"]) is None
    started = plugin._run_started()  # this process's parent: started before us
    assert started is None or started <= time.time()


@pytest.mark.parametrize("log_text,expected", [
    ("sshnp: error: tunnel: relay connection lost: the stream from relay @rv_eu ended\n", "5"),
    ("sshnp: error: relay: relay @rv_eu did not answer within 20s\n", "5"),
    ("sshnp: error: device: @alice_device did not answer within 15s\n", None),
])
def test_retry_after_a_relay_failure_waits_less_for_the_relay(monkeypatch, log_text, expected):
    """After the hold, a retry through a dead relay costs 5 s, not the whole relay timeout."""
    import time
    conn, _calls = _held_setup(monkeypatch, run_started=time.time() - 60, log_text=log_text)
    argv = client_argv(opts_of(build(conn, "true"))["proxycommand"])
    got = argv[argv.index("--relay-timeout") + 1] if "--relay-timeout" in argv else None
    assert got == expected


# -- the next rendezvous in the background, late in the hold (issue 15: async 60 within 60 s) --

class _FakeProbe:
    """What start_probe spawns (``ssh -N``): records the argv; ``rc`` None while running."""

    spawned: list = []

    def __init__(self, argv, **kwargs):
        self.argv, self.kwargs, self.pid, self.rc = argv, kwargs, os.getpid(), None
        _FakeProbe.spawned.append(self)

    def poll(self):
        return self.rc


def _probe_setup(monkeypatch, age: float, **opts):
    import time
    conn, calls = _held_setup(monkeypatch, run_started=time.time() - 120, **opts)
    log = Path(conn.client_log_path(conn.sshnp_identity()))
    os.utime(log, (time.time() - age, time.time() - age))
    _FakeProbe.spawned = []
    monkeypatch.setattr(plugin.subprocess, "Popen", _FakeProbe)
    monkeypatch.setattr(plugin, "_PROBES", {})
    return conn, calls, log


def test_early_in_the_hold_no_background_rendezvous(monkeypatch):
    conn, calls, _log = _probe_setup(monkeypatch, age=5)
    with pytest.raises(AnsibleConnectionFailure, match="a new rendezvous is tried 30s after"):
        conn.exec_command("true")
    assert calls == [] and _FakeProbe.spawned == []


def test_late_in_the_hold_the_next_rendezvous_runs_in_the_background(monkeypatch):
    """A retry loop never waits for the rendezvous: it starts ``ssh -N`` (a master, with the
    tunnel's ProxyCommand) and fails at once; later retries fail at once while it runs; once
    it failed, its fresh failure is held; once its master is up, retries go through."""
    conn, calls, log = _probe_setup(monkeypatch, age=25)
    with pytest.raises(AnsibleConnectionFailure, match="a new rendezvous is tried 30s after"):
        conn.exec_command("true")
    assert calls == [] and len(_FakeProbe.spawned) == 1
    probe = _FakeProbe.spawned[0]
    argv = [a.decode() for a in probe.argv]
    assert argv[-2:] == ["-N", conn.host] and "proxycommand" in opts_of(probe.argv)
    assert probe.kwargs["start_new_session"] and probe.kwargs["stdin"] == plugin.subprocess.DEVNULL
    # its ProxyCommand empties the client log; retries still fail at once, no second probe
    log.write_text("")
    with pytest.raises(AnsibleConnectionFailure) as err:
        conn.exec_command("true")
    assert str(err.value).startswith("sshnp: tunnel: relay connection lost: the stream from "
                                     "relay @rv_eu")
    assert str(err.value).endswith("(failed 25s ago in this run; a new rendezvous is under way "
                                   "in the background: failure_hold)")
    assert calls == [] and len(_FakeProbe.spawned) == 1
    # it failed (its client wrote a fresh error): a new hold, from now
    probe.rc = 255
    log.write_text("sshnp: error: relay: relay @rv_eu did not answer within 5s\n")
    with pytest.raises(AnsibleConnectionFailure, match=r"^sshnp: relay: relay @rv_eu did not "
                       r"answer within 5s .*\(failed 0s ago in this run; a new rendezvous is "
                       r"tried 30s after the failure: failure_hold\)$"):
        conn.exec_command("true")
    assert not Path(conn.probe_path(conn.sshnp_identity())).exists()
    assert calls == [] and len(_FakeProbe.spawned) == 1
    # a later probe brings the master up: the next retry uses it
    sock = Path(plugin._control_path(build(conn, "true")))
    sock.parent.mkdir(parents=True, exist_ok=True)
    sock.write_text("")
    assert conn.exec_command("true")[:2] == (0, b"ok\n")
    assert len(calls) == 1


def test_a_finished_probe_that_left_no_master_lets_the_next_attempt_through(monkeypatch):
    conn, calls, log = _probe_setup(monkeypatch, age=25)
    with pytest.raises(AnsibleConnectionFailure):
        conn.exec_command("true")
    _FakeProbe.spawned[0].rc = 0  # authenticated; its master already expired
    log.write_text("")
    assert conn.exec_command("true")[:2] == (0, b"ok\n")
    assert len(calls) == 1


def test_no_background_rendezvous_with_a_password(monkeypatch):
    conn, calls, _log = _probe_setup(monkeypatch, age=25, ansible_password="pw")
    with pytest.raises(AnsibleConnectionFailure):
        conn.exec_command("true")
    assert _FakeProbe.spawned == [] and calls == []


def test_a_held_failure_skips_the_reconnection_retry_pauses(monkeypatch):
    """ssh.py's reconnection_retries pause 0, 1, 3 ... s between attempts; a held failure
    would only be held again after each pause."""
    import time
    conn, calls = _held_setup(monkeypatch, run_started=time.time() - 60,
                              ansible_ssh_retries=3)
    pauses: list[float] = []
    monkeypatch.setattr(ssh_mod.time, "sleep", pauses.append)
    with pytest.raises(AnsibleConnectionFailure, match="failure_hold"):
        conn.exec_command("true")
    assert pauses == [] and calls == []


def test_reset_without_a_master_spawns_no_ssh(monkeypatch):
    """async/poll calls reset() after each failed retry: no ``ssh -O check`` per retry."""
    spawned = []
    monkeypatch.setattr(ssh_mod.subprocess, "Popen", lambda *a, **k: spawned.append(a))
    conn = make_conn()
    conn.reset()
    assert spawned == []
    sock = Path(plugin._control_path(build(conn, "true")))
    sock.parent.mkdir(parents=True, exist_ok=True)
    sock.write_text("")

    class _Done:
        returncode = 1

        def communicate(self):
            return b"", b"no master"

        def wait(self):
            return 1
    monkeypatch.setattr(ssh_mod.subprocess, "Popen", lambda *a, **k: spawned.append(a) or _Done())
    conn.reset()
    assert len(spawned) == 1 and b"check" in spawned[0][0]


def test_a_previous_runs_background_rendezvous_holds_nothing(monkeypatch):
    import json
    import time
    conn, calls, log = _probe_setup(monkeypatch, age=25)
    log.write_text("")  # its ProxyCommand emptied the log
    marker = Path(conn.probe_path(conn.sshnp_identity()))
    marker.write_text(json.dumps({"pid": os.getpid(), "started": time.time() - 200,
                                  "step": "relay: x", "failed": time.time() - 220}))
    assert conn.exec_command("true")[:2] == (0, b"ok\n")  # this run started 120 s ago
    assert len(calls) == 1 and _FakeProbe.spawned == []
