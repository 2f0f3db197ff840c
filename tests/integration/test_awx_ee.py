"""AWX / AAP: an execution environment built from the collection runs sshnp plays.

No container engine runs here, so the build is taken apart into the steps it runs, each done
for real with the generated build context (docs/awx.md, docs/decisions/0018):

1. ``ansible-galaxy collection build`` of this checkout (what users ship) and
   ``ansible-builder create`` with the EE definition of docs/awx.md: the Containerfile installs
   the collection from the tarball, runs the introspection and pip assembly, and copies the
   collections into the final stage BEFORE installing the Python requirements there (the
   runtime's requirement points into the installed collection);
2. the galaxy stage's ``ansible-galaxy collection install -r requirements.yml`` in the context,
   then the context's own ``introspect.py`` (the script the Containerfile runs): it finds
   meta/execution-environment.yml and returns the collection's Python requirements (equal to
   pyproject.toml's dependencies, plus the runtime at the path ansible-builder installs
   collections to) and the bindep list (the OpenSSH client for RPM and for dpkg platforms,
   checked with bindep itself);
3. the runtime's requirement, relocated to where step 2 installed the collection, installed
   with pip: the ``noports`` package is the collection's ``src/noports`` and ``sshnp`` exists;
4. ``ansible-runner run`` (what AWX runs in the EE) of a play through ``ansible_connection:
   sshnp`` against a real device (the loopback world of test_inventory_live.py: plane, srvd,
   sshnpd, OpenSSH sshd), with what AWX gives a job: the custom credential type of
   docs/awx.md rendered as AWX does (``.atKeys`` written to a 0600 file in the private data
   directory, ``ANSIBLE_SSHNP_*`` variables), the collection and ``ENV`` of step 1/2, the
   runtime of step 3, and a private ControlPath directory ``<private data dir>/cp``; the
   plugin's default agent starts there on demand (from the EE's runtime), and exits when
   the job's masters are gone and its idle time has passed.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import jinja2.sandbox
import pytest
import tomllib
import yaml
from test_inventory_live import CLIENT, DEV_A, RELAY, Live

from tests.harness.ansible import REPO, agent_pids, ansible_tool, close_masters

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

PY = sys.executable
BIN = Path(PY).parent
DOC = REPO / "docs" / "awx.md"
COLLECTIONS_IN_EE = "/usr/share/ansible/collections"  # ansible_builder.constants
TARBALL = "noports-sshnp-0.1.0.tar.gz"
AGENT_IDLE_S = 3


def doc_yaml(first_key: str) -> dict:
    """The ``yaml`` block of docs/awx.md whose first key is ``first_key``."""
    for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and next(iter(data)) == first_key:
            return data
    raise AssertionError(f"no yaml block starting with {first_key!r} in {DOC}")


def run(argv: list[str], *, cwd: Path, timeout: float = 180, **env: str) -> str:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **env},
                         check=False)
    assert res.returncode == 0, f"{' '.join(argv)}: rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


class EE:
    """The build context and the build steps of step 1 to 3, done once for the module."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.times: dict[str, float] = {}
        t = time.monotonic()
        run([ansible_tool("ansible-galaxy"), "collection", "build", "--force",
             "--output-path", str(base), str(REPO)], cwd=base)
        self.tarball = base / TARBALL
        self.times["collection build"] = time.monotonic() - t
        self.definition = doc_yaml("version")
        (base / "execution-environment.yml").write_text(yaml.safe_dump(self.definition))
        t = time.monotonic()
        run([str(BIN / "ansible-builder"), "create", "-f", "execution-environment.yml",
             "-c", "context", "--output-filename", "Containerfile"], cwd=base)
        self.times["ansible-builder create"] = time.monotonic() - t
        self.context = base / "context"
        self.containerfile = (self.context / "Containerfile").read_text()
        # galaxy stage: WORKDIR /build (= context/_build), install to the collections path
        self.collections = base / "usr-share-ansible-collections"
        t = time.monotonic()
        run([ansible_tool("ansible-galaxy"), "collection", "install", "-r", "requirements.yml",
             "--collections-path", str(self.collections)], cwd=self.context / "_build",
            ANSIBLE_GALAXY_DISABLE_GPG_VERIFY="1")
        self.installed = self.collections / "ansible_collections" / "noports" / "sshnp"
        # builder stage: the context's introspect.py, as the Containerfile's RUN line calls it
        run([PY, str(self.context / "_build" / "scripts" / "introspect.py"), "introspect",
             f"--write-bindep={base / 'bindep.txt'}", f"--write-pip={base / 'requirements.txt'}",
             str(self.collections)], cwd=base)
        self.pip_lines = (base / "requirements.txt").read_text().splitlines()
        self.bindep = (base / "bindep.txt").read_text()
        # the runtime requirement, relocated to where the galaxy step installed the collection
        runtime = [ln for ln in self.pip_lines if ln.startswith("noports @ ")]
        assert len(runtime) == 1, self.pip_lines
        self.runtime_line = runtime[0].split("#")[0].strip()
        local = self.runtime_line.replace(f"file://{COLLECTIONS_IN_EE}",
                                          f"file://{self.collections}")
        self.site = base / "ee-site"
        run([PY, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(self.site), local],
            cwd=base, timeout=300)
        self.times["galaxy install + introspect + pip (runtime)"] = time.monotonic() - t


@pytest.fixture(scope="module")
def ee(tmp_path_factory: pytest.TempPathFactory) -> EE:
    built = EE(tmp_path_factory.mktemp("awx-ee"))
    print("\n" + ", ".join(f"{k}: {v:.1f}s" for k, v in built.times.items()))
    return built


def test_containerfile_installs_the_collection_then_its_requirements(ee: EE) -> None:
    cf = ee.containerfile
    assert re.search(r"^RUN .*ansible-galaxy collection install .*-r requirements\.yml "
                     rf'--collections-path "{COLLECTIONS_IN_EE}"$', cf, re.M), cf
    assert "introspect.py introspect" in cf and "--write-pip=/tmp/src/requirements.txt" in cf
    assert "--write-bindep=/tmp/src/bindep.txt" in cf and "RUN /output/scripts/assemble" in cf
    final = cf[cf.index("FROM base AS final"):]
    # the runtime is pip-installed from the collection: it must be there first
    copy = final.index("COPY --from=galaxy /usr/share/ansible /usr/share/ansible")
    assert copy < final.index("RUN /output/scripts/install-from-bindep"), final
    builder = cf[cf.index("AS builder"):cf.index("FROM base AS final")]
    assert builder.index("COPY --from=galaxy") < builder.index("introspect.py"), builder
    assert "ENV ANSIBLE_CONNECTION_PLUGINS=" in final
    # the tarball is in the context, the galaxy requirements name it
    assert (ee.context / "_build" / "collections" / TARBALL).is_file()
    reqs = yaml.safe_load((ee.context / "_build" / "requirements.yml").read_text())
    assert reqs["collections"] == [{"name": f"collections/{TARBALL}", "type": "file"}]


def test_tarball_ships_what_the_ee_needs(ee: EE) -> None:
    with tarfile.open(ee.tarball) as tar:
        names = set(tar.getnames())
    for needed in ("meta/execution-environment.yml", "meta/ee-requirements.txt",
                   "meta/ee-bindep.txt", "pyproject.toml", "README.md",
                   "LICENSES/BSD-3-Clause.txt", "src/noports/client/cli.py",
                   "plugins/connection/sshnp.py"):
        assert needed in names, needed


def test_introspection_gives_the_runtime_and_its_dependencies(ee: EE) -> None:
    ours = {ln.split("  # from collection")[0] for ln in ee.pip_lines
            if ln.endswith("# from collection noports.sshnp")}
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert ours == {*deps, ee.runtime_line}, (ours, deps)
    assert ee.runtime_line == (f"noports @ file://{COLLECTIONS_IN_EE}"
                               "/ansible_collections/noports/sshnp")
    from ansible_builder import constants
    assert constants.base_collections_path == COLLECTIONS_IN_EE


def test_bindep_gives_the_openssh_client_on_rpm_and_dpkg(ee: EE) -> None:
    from bindep.depends import Depends

    deps = Depends(ee.bindep)
    names = {p: {r[0] for r in deps.active_rules(profiles)} for p, profiles in {
        "rpm": ["platform:rpm", "platform:redhat", "platform:centos"],
        "dpkg": ["platform:dpkg", "platform:debian"]}.items()}
    assert names == {"rpm": {"openssh-clients"}, "dpkg": {"openssh-client"}}
    assert "# from collection noports.sshnp" in ee.bindep


def test_runtime_is_installed_from_the_collections_own_copy(ee: EE) -> None:
    src = REPO / "src" / "noports"
    files = sorted(p.relative_to(src) for p in src.rglob("*.py"))
    assert files
    for rel in files:
        assert (ee.site / "noports" / rel).read_bytes() == (src / rel).read_bytes(), rel
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name in scripts:
        assert (ee.site / "bin" / name).is_file(), name


# ------------------------------------------------------------------ a job, as AWX runs it


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory):
    world = Live(tmp_path_factory.mktemp("awx-live"))
    yield world
    world.stop()


def inject_credential(inputs: dict[str, str], pdd: Path) -> dict[str, str]:
    """Render docs/awx.md's injector as AWX does: each ``file`` template to a new 0600 file in
    the private data directory's ``env/``, then the ``env`` templates with ``tower.filename``."""
    fields = doc_yaml("fields")
    assert set(fields["required"]) <= set(inputs)
    values = {f["id"]: inputs.get(f["id"], f.get("default", "")) for f in fields["fields"]}
    injectors = doc_yaml("file")
    jenv = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
    filenames = {}
    for key, template in injectors["file"].items():
        fd, path = tempfile.mkstemp(dir=pdd / "env")
        with os.fdopen(fd, "w") as f:
            f.write(jenv.from_string(template).render(**values))
        os.chmod(path, 0o600)
        filenames[key.removeprefix("template.")] = path
    ns = {**values, "tower": {"filename": filenames}}
    return {k: jenv.from_string(v).render(**ns) for k, v in injectors["env"].items()}


PLAY = """\
- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.ping:
    - ansible.builtin.copy:
        content: "job {{ awx_job_id }}\\n"
        dest: "{{ work }}/job.txt"
        mode: "0600"
    - ansible.builtin.command: cat {{ work }}/job.txt
      register: out
      changed_when: false
    - ansible.builtin.assert:
        that: out.stdout == "job " ~ awx_job_id
"""


def test_ansible_runner_job_through_sshnp_with_injected_credential(ee: EE, live: Live,
                                                                   tmp_path) -> None:
    pdd = tmp_path / "job"  # the job's private data directory (/runner in the EE)
    for d in ("env", "project", "inventory"):
        (pdd / d).mkdir(parents=True)
    (pdd / "cp").mkdir(mode=0o700)
    (pdd / "project" / "play.yml").write_text(PLAY)
    work = tmp_path / "work"
    work.mkdir()
    # the inventory names the device only: who we are and the keys come from the credential
    host = {"ansible_connection": "sshnp", "ansible_sshnp_device_atsign": DEV_A,
            "ansible_sshnp_device": "alpha", "ansible_user": live.user,
            "ansible_port": live.sshd_port, "ansible_ssh_private_key_file": str(live.identity),
            "ansible_python_interpreter": PY,
            # the EE's sshnp: the console script pip installed from the collection (step 3)
            "ansible_sshnp_executable": str(ee.site / "bin" / "sshnp")}
    (pdd / "inventory" / "hosts.json").write_text(json.dumps({"all": {"hosts": {"alpha": host}}}))
    cred = inject_credential({"client_atsign": CLIENT,
                              "atkeys": live.keyfile(CLIENT).read_text(),
                              "root_domain": live.root,
                              "ca_pem": Path(live.ca).read_text(), "relays": RELAY}, pdd)
    keys_file = Path(cred["ANSIBLE_SSHNP_KEYS_FILE"])
    assert keys_file.parent == pdd / "env" and stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert keys_file.read_text() == live.keyfile(CLIENT).read_text()
    # the EE's ENV line, relocated like the collection
    env_line = re.search(r"^ENV ANSIBLE_CONNECTION_PLUGINS=(\S+)$", ee.containerfile, re.M)
    assert env_line
    envvars = {
        **cred,
        "ANSIBLE_CONNECTION_PLUGINS": env_line.group(1).replace(COLLECTIONS_IN_EE,
                                                                str(ee.collections)),
        "ANSIBLE_COLLECTIONS_PATH": str(ee.collections),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(pdd / "cp"),  # AWX: /runner/cp
        "SSHNP_AGENT_IDLE": str(AGENT_IDLE_S),  # the agent's idle exit, short for the test
        "PYTHONPATH": str(ee.site),  # the EE's runtime, not this checkout's
        "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
    }
    (pdd / "env" / "envvars").write_text(json.dumps(envvars))
    (pdd / "env" / "extravars").write_text(json.dumps({"work": str(work), "awx_job_id": 42}))
    # bytecode written on import shows which copy of noports the sshnp client ran from
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ANSIBLE_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(HOME=str(live.home), PATH=f"{BIN}:{env['PATH']}")
    t0 = time.monotonic()
    try:
        res = subprocess.run([str(BIN / "ansible-runner"), "run", str(pdd), "-p", "play.yml",
                              "--ident", "42"], capture_output=True, text=True, env=env,
                             timeout=240, check=False)
        seconds = time.monotonic() - t0
        artifacts = pdd / "artifacts" / "42"
        out = res.stdout + res.stderr
        assert res.returncode == 0, (out[-6000:], live.logs())
        assert (artifacts / "status").read_text() == "successful"
        assert (artifacts / "rc").read_text() == "0"
        events = [json.loads(p.read_text()) for p in (artifacts / "job_events").glob("*.json")]
        ok = [e for e in events if e.get("event") == "runner_on_ok"]
        assert len(ok) == 4 and {e["event_data"]["host"] for e in ok} == {"alpha"}, out
        assert (work / "job.txt").read_text() == "job 42\n"
        # the OpenSSH master of this job lives in the job's cp/, nowhere else
        assert [p for p in (pdd / "cp").iterdir() if p.is_socket()], list((pdd / "cp").iterdir())
        assert not (live.home / ".ansible" / "cp").exists() or not any(
            (live.home / ".ansible" / "cp").iterdir())
        # the client that ran is the one pip installed from the collection (it was imported)
        assert list((ee.site / "noports" / "client").glob("__pycache__/*.pyc")), "not imported"
        # the tunnel came from the plugin's default agent, started on demand in the job's
        # private control dir (0700, its socket there), not in the user's home
        agent_dir = pdd / "cp" / "sshnp-agent"
        agents = agent_pids(pdd / "cp")
        assert len(agents) == 1, (agents, out[-3000:])
        assert stat.S_IMODE(agent_dir.stat().st_mode) == 0o700
        assert (agent_dir / "agent.sock").is_socket()
        assert " ready in " in (agent_dir / "agent.log").read_text()
        assert list((ee.site / "noports" / "agent").glob("__pycache__/*.pyc")), "not the EE's"
        print(f"\nansible-runner job over sshnp: {seconds:.1f}s")
        # the job's masters gone, the agent exits after its idle time and removes its socket
        close_masters(pdd / "cp", stop_agent=False)
        deadline = time.monotonic() + AGENT_IDLE_S + 30
        while agent_pids(pdd / "cp") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert agent_pids(pdd / "cp") == [], "the job's agent did not exit when idle"
        assert not (agent_dir / "agent.sock").exists()
    finally:
        close_masters(pdd / "cp")
