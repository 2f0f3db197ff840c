# Copyright (c) noports.sshnp developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Documentation fragments of the noports.sshnp collection.

``DOCUMENTATION`` (``noports.sshnp.sshnp``): the atPlatform options that the ``sshnp``
connection plugin and the ``devices`` inventory plugin share. Each plugin adds its own
sources (``vars:``/``ini:``) on top; the ``ANSIBLE_SSHNP_*`` environment variables work for both.

``SSH`` (``noports.sshnp.sshnp.ssh``): every option of ``ansible.builtin.ssh``, copied from
ansible-core 2.19 (the same in 2.20 and 2.21). The connection plugin subclasses the ssh plugin,
whose code calls ``get_option()`` on each of these, so all of them must be declared; the
plugin's own DOCUMENTATION is read by AST, but fragments are imported, so the literal below is
what the sanity tests lint and :func:`for_ansible_core` adapts it, at import, to the running
ansible-core when its ssh plugin declares other options or defaults (docs/decisions/0018):

* 2.16: no ``verbosity``, ``password_mechanism``, ``private_key``, ``private_key_passphrase``;
  ``ssh_transfer_method`` has NO default and ``scp_if_ssh`` (default ``smart``) decides when it
  is unset; with 2.19's ``smart`` default, ``ansible_scp_if_ssh`` would be ignored there.
* 2.17, 2.18: no ``verbosity``, ``password_mechanism``, ``private_key``,
  ``private_key_passphrase``.

tests/unit/plugins/connection/test_sshnp.py fails when the installed ansible-core declares an
ssh option that is missing here; tests/integration/test_ansible_versions.py compares names and
defaults with ``ansible-doc -t connection ssh --json`` of the oldest and the newest
ansible-core: re-sync this block then.
"""

from __future__ import annotations

import yaml


class ModuleDocFragment:

    DOCUMENTATION = r"""
options:
  client_atsign:
    description:
      - The client atSign (yours), whose C(.atKeys) file authenticates to its atServer.
      - It must be in the device daemon's managers list (C(sshnpd -m)).
    type: string
    env:
      - name: ANSIBLE_SSHNP_CLIENT_ATSIGN
  keys_file:
    description:
      - The client C(.atKeys) file.
      - Defaults to C(~/.atsign/keys/<client atSign>_key.atKeys), as for the C(sshnp) CLI.
    type: path
    env:
      - name: ANSIBLE_SSHNP_KEYS_FILE
  root_domain:
    description:
      - The atDirectory as C(host[:port]); port 64 when omitted.
      - Point it at a self-hosted control plane (for example V(127.0.0.1:6464)) or keep the public atPlatform.
    type: string
    default: root.atsign.org:64
    env:
      - name: ANSIBLE_SSHNP_ROOT_DOMAIN
  ca_file:
    description:
      - PEM file with the CA that signed the atDirectory and atServer TLS certificates (self-hosted planes).
      - When unset the system trust store (and E(SSL_CERT_FILE)) is used.
    type: path
    env:
      - name: ANSIBLE_SSHNP_CA_FILE
  relays:
    description:
      - Socket rendezvous (C(srvd)) atSigns, tried in order until one answers.
      - A list, or a comma-separated string.
    type: list
    elements: string
    env:
      - name: ANSIBLE_SSHNP_RELAYS
"""

    SSH = r"""
options:
  host:
      description: Hostname/IP to connect to.
      default: inventory_hostname
      type: string
      vars:
           - name: inventory_hostname
           - name: ansible_host
           - name: ansible_ssh_host
           - name: delegated_vars['ansible_host']
           - name: delegated_vars['ansible_ssh_host']
  host_key_checking:
      description: Determines if SSH should reject or not a connection after checking host keys.
      default: True
      type: boolean
      ini:
          - section: defaults
            key: 'host_key_checking'
          - section: ssh_connection
            key: 'host_key_checking'
      env:
          - name: ANSIBLE_HOST_KEY_CHECKING
          - name: ANSIBLE_SSH_HOST_KEY_CHECKING
      vars:
          - name: ansible_host_key_checking
          - name: ansible_ssh_host_key_checking
  password:
      description: Authentication password for the O(remote_user). Can be supplied as CLI option.
      type: string
      vars:
          - name: ansible_password
          - name: ansible_ssh_pass
          - name: ansible_ssh_password
  password_mechanism:
      description: Mechanism to use for handling ssh password prompt
      type: string
      default: ssh_askpass
      choices:
          - ssh_askpass
          - sshpass
          - disable
      env:
          - name: ANSIBLE_SSH_PASSWORD_MECHANISM
      ini:
          - {key: password_mechanism, section: ssh_connection}
      vars:
          - name: ansible_ssh_password_mechanism
  sshpass_prompt:
      description:
          - Password prompt that C(sshpass)/C(SSH_ASKPASS) should search for.
          - Supported by sshpass 1.06 and up when O(password_mechanism) set to V(sshpass).
          - Defaults to C(Enter PIN for) when pkcs11_provider is set.
          - Defaults to C(assword) when O(password_mechanism) set to V(ssh_askpass).
      default: ''
      type: string
      ini:
          - section: 'ssh_connection'
            key: 'sshpass_prompt'
      env:
          - name: ANSIBLE_SSHPASS_PROMPT
      vars:
          - name: ansible_sshpass_prompt
  ssh_args:
      description: Arguments to pass to all SSH CLI tools.
      default: '-C -o ControlMaster=auto -o ControlPersist=60s'
      type: string
      ini:
          - section: 'ssh_connection'
            key: 'ssh_args'
      env:
          - name: ANSIBLE_SSH_ARGS
      vars:
          - name: ansible_ssh_args
  ssh_common_args:
      description: Common extra args for all SSH CLI tools.
      type: string
      ini:
          - section: 'ssh_connection'
            key: 'ssh_common_args'
      env:
          - name: ANSIBLE_SSH_COMMON_ARGS
      vars:
          - name: ansible_ssh_common_args
      cli:
          - name: ssh_common_args
      default: ''
  ssh_executable:
      default: ssh
      description:
        - This defines the location of the SSH binary. It defaults to V(ssh) which will use the first SSH binary available in $PATH.
        - This option is usually not required, it might be useful when access to system SSH is restricted,
          or when using SSH wrappers to connect to remote hosts.
      type: string
      env: [{name: ANSIBLE_SSH_EXECUTABLE}]
      ini:
      - {key: ssh_executable, section: ssh_connection}
      #const: ANSIBLE_SSH_EXECUTABLE
      vars:
          - name: ansible_ssh_executable
  sftp_executable:
      default: sftp
      description:
        - This defines the location of the sftp binary. It defaults to V(sftp) which will use the first binary available in $PATH.
      type: string
      env: [{name: ANSIBLE_SFTP_EXECUTABLE}]
      ini:
      - {key: sftp_executable, section: ssh_connection}
      vars:
          - name: ansible_sftp_executable
  scp_executable:
      default: scp
      description:
        - This defines the location of the scp binary. It defaults to V(scp) which will use the first binary available in $PATH.
      type: string
      env: [{name: ANSIBLE_SCP_EXECUTABLE}]
      ini:
      - {key: scp_executable, section: ssh_connection}
      vars:
          - name: ansible_scp_executable
  scp_extra_args:
      description: Extra exclusive to the C(scp) CLI
      type: string
      vars:
          - name: ansible_scp_extra_args
      env:
        - name: ANSIBLE_SCP_EXTRA_ARGS
      ini:
        - key: scp_extra_args
          section: ssh_connection
      cli:
        - name: scp_extra_args
      default: ''
  sftp_extra_args:
      description: Extra exclusive to the C(sftp) CLI
      type: string
      vars:
          - name: ansible_sftp_extra_args
      env:
        - name: ANSIBLE_SFTP_EXTRA_ARGS
      ini:
        - key: sftp_extra_args
          section: ssh_connection
      cli:
        - name: sftp_extra_args
      default: ''
  ssh_extra_args:
      description: Extra exclusive to the SSH CLI.
      type: string
      vars:
          - name: ansible_ssh_extra_args
      env:
        - name: ANSIBLE_SSH_EXTRA_ARGS
      ini:
        - key: ssh_extra_args
          section: ssh_connection
      cli:
        - name: ssh_extra_args
      default: ''
  reconnection_retries:
      description:
        - Number of attempts to connect.
        - Ansible retries connections only if it gets an SSH error with a return code of 255.
        - Any errors with return codes other than 255 indicate an issue with program execution.
      default: 0
      type: integer
      env:
        - name: ANSIBLE_SSH_RETRIES
      ini:
        - section: connection
          key: retries
        - section: ssh_connection
          key: retries
      vars:
        - name: ansible_ssh_retries
  port:
      description: Remote port to connect to.
      type: int
      ini:
        - section: defaults
          key: remote_port
      env:
        - name: ANSIBLE_REMOTE_PORT
      vars:
        - name: ansible_port
        - name: ansible_ssh_port
      keyword:
        - name: port
  remote_user:
      description:
          - User name with which to login to the remote server, normally set by the remote_user keyword.
          - If no user is supplied, Ansible will let the SSH client binary choose the user as it normally.
      type: string
      ini:
        - section: defaults
          key: remote_user
      env:
        - name: ANSIBLE_REMOTE_USER
      vars:
        - name: ansible_user
        - name: ansible_ssh_user
      cli:
        - name: user
      keyword:
        - name: remote_user
  pipelining:
      default: false
      type: boolean
      description:
        - Pipelining reduces the number of connection operations required to execute a module on the remote server,
          by executing many Ansible modules without actual file transfers.
        - This can result in a very significant performance improvement when enabled.
        - However this can conflict with privilege escalation (C(become)).
          For example, when using sudo operations you must first disable C(requiretty) in the sudoers file for the target hosts,
          which is why this feature is disabled by default.
      env:
        - name: ANSIBLE_PIPELINING
        - name: ANSIBLE_SSH_PIPELINING
      ini:
        - section: defaults
          key: pipelining
        - section: connection
          key: pipelining
        - section: ssh_connection
          key: pipelining
      vars:
        - name: ansible_pipelining
        - name: ansible_ssh_pipelining
  private_key_file:
      description:
          - Path to private key file to use for authentication.
      type: string
      ini:
        - section: defaults
          key: private_key_file
      env:
        - name: ANSIBLE_PRIVATE_KEY_FILE
      vars:
        - name: ansible_private_key_file
        - name: ansible_ssh_private_key_file
      cli:
        - name: private_key_file
          option: '--private-key'
  private_key:
      description:
        - Private key contents in PEM format. Requires the C(SSH_AGENT) configuration to be enabled.
      type: string
      env:
        - name: ANSIBLE_PRIVATE_KEY
      vars:
        - name: ansible_private_key
        - name: ansible_ssh_private_key
  private_key_passphrase:
      description:
        - Private key passphrase, dependent on O(private_key).
        - This does NOT have any effect when used with O(private_key_file).
      type: string
      env:
        - name: ANSIBLE_PRIVATE_KEY_PASSPHRASE
      vars:
        - name: ansible_private_key_passphrase
        - name: ansible_ssh_private_key_passphrase
  control_path:
    description:
      - This is the location to save SSH's ControlPath sockets, it uses SSH's variable substitution.
      - Since 2.3, if null (default), ansible will generate a unique hash. Use ``%(directory)s`` to indicate where to use the control dir path setting.
      - Before 2.3 it defaulted to ``control_path=%(directory)s/ansible-ssh-%%h-%%p-%%r``.
      - Be aware that this setting is ignored if C(-o ControlPath) is set in ssh args.
    type: string
    env:
      - name: ANSIBLE_SSH_CONTROL_PATH
    ini:
      - key: control_path
        section: ssh_connection
    vars:
      - name: ansible_control_path
  control_path_dir:
    default: ~/.ansible/cp
    description:
      - This sets the directory to use for ssh control path if the control path setting is null.
      - Also, provides the ``%(directory)s`` variable for the control path setting.
    type: string
    env:
      - name: ANSIBLE_SSH_CONTROL_PATH_DIR
    ini:
      - section: ssh_connection
        key: control_path_dir
    vars:
      - name: ansible_control_path_dir
  sftp_batch_mode:
    default: true
    description:
      - When set to C(True), sftp will be run in batch mode, allowing detection of transfer errors.
      - When set to C(False), sftp will not be run in batch mode, preventing detection of transfer errors.
    env: [{name: ANSIBLE_SFTP_BATCH_MODE}]
    ini:
    - {key: sftp_batch_mode, section: ssh_connection}
    type: bool
    vars:
      - name: ansible_sftp_batch_mode
  ssh_transfer_method:
    description: Preferred method to use when transferring files over ssh
    choices:
          sftp: This is the most reliable way to copy things with SSH.
          scp: Deprecated in OpenSSH. For OpenSSH >=9.0 you must add an additional option to enable scp C(scp_extra_args="-O").
          piped: Creates an SSH pipe with C(dd) on either side to copy the data.
          smart: Tries each method in order (sftp > scp > piped), until one succeeds or they all fail.
    default: smart
    type: string
    env: [{name: ANSIBLE_SSH_TRANSFER_METHOD}]
    ini:
        - {key: transfer_method, section: ssh_connection}
    vars:
        - name: ansible_ssh_transfer_method
  use_tty:
    default: true
    description: add -tt to ssh commands to force tty allocation.
    env: [{name: ANSIBLE_SSH_USETTY}]
    ini:
    - {key: usetty, section: ssh_connection}
    type: bool
    vars:
      - name: ansible_ssh_use_tty
  timeout:
    default: 10
    description:
        - This is the default amount of time we will wait while establishing an SSH connection.
        - It also controls how long we can wait to access reading the connection once established (select on the socket).
    env:
        - name: ANSIBLE_TIMEOUT
        - name: ANSIBLE_SSH_TIMEOUT
    ini:
        - key: timeout
          section: defaults
        - key: timeout
          section: ssh_connection
    vars:
      - name: ansible_ssh_timeout
    cli:
      - name: timeout
    type: integer
  pkcs11_provider:
    default: ""
    type: string
    description:
      - "PKCS11 SmartCard provider such as opensc, example: /usr/local/lib/opensc-pkcs11.so"
    env: [{name: ANSIBLE_PKCS11_PROVIDER}]
    ini:
      - {key: pkcs11_provider, section: ssh_connection}
    vars:
      - name: ansible_ssh_pkcs11_provider
  verbosity:
    default: 0
    type: int
    description:
      - Requested verbosity level for the SSH CLI.
    env: [{name: ANSIBLE_SSH_VERBOSITY}]
    ini:
      - {key: verbosity, section: ssh_connection}
    vars:
      - name: ansible_ssh_verbosity
"""


# Options of the ssh plugin that ansible-core declares only from this version on.
SSH_OPTIONS_SINCE: dict[str, tuple[int, int]] = {
    "password_mechanism": (2, 19),
    "private_key": (2, 19),
    "private_key_passphrase": (2, 19),
    "verbosity": (2, 19),
}

# ansible-core 2.16's ssh reads this when ssh_transfer_method is unset (it has no default there).
SCP_IF_SSH_2_16 = r"""
options:
  scp_if_ssh:
      default: smart
      description:
        - Only declared with ansible-core 2.16 (removed from the ssh plugin in 2.17); use O(ssh_transfer_method) instead.
        - "Preferred method to use when transferring files over SSH: V(smart), V(True) (scp) or V(False) (sftp)."
        - This setting is overridden by O(ssh_transfer_method) if set.
      env: [{name: ANSIBLE_SCP_IF_SSH}]
      ini:
        - {key: scp_if_ssh, section: ssh_connection}
      vars:
        - name: ansible_scp_if_ssh
"""


def core_version(version: str) -> tuple[int, int]:
    """``"2.16.19"`` -> ``(2, 16)``."""
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def for_ansible_core(ssh_doc: str, version: tuple[int, int]) -> str:
    """The ``SSH`` fragment as the ssh plugin of ansible-core ``version`` declares its options."""
    doc = yaml.safe_load(ssh_doc)
    options = doc["options"]
    for name, since in SSH_OPTIONS_SINCE.items():
        if version < since:
            options.pop(name, None)
    if version < (2, 17):
        options["ssh_transfer_method"].pop("default", None)
        options.update(yaml.safe_load(SCP_IF_SSH_2_16)["options"])
    return yaml.safe_dump(doc, sort_keys=False)


def _running_core() -> tuple[int, int] | None:
    try:
        from ansible.release import __version__
    except ImportError:  # imported outside Ansible (docs rendering): keep the literal
        return None
    return core_version(__version__)


_RUNNING = _running_core()
if _RUNNING is not None and _RUNNING < (2, 19):
    ModuleDocFragment.SSH = for_ansible_core(ModuleDocFragment.SSH, _RUNNING)
