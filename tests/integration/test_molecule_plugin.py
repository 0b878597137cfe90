"""The molecule driver anyone can use: a role written here, outside roles/, goes through `molecule test` on
pymachine local machines with `driver: {name: molecule-pymachine}`; an interrupted create is destroyed without
a trace; a platform pymachine cannot make is refused in one line before anything is made."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.conftest import bridge_leftovers, journal_record, leftovers, machine_cli
from tests.integration.test_inventory import VENV_BIN
from tests.integration.test_molecule import ANSI, scenario_env

pytestmark = pytest.mark.integration

TASKS = """\
- name: Say hello in a file
  ansible.builtin.copy:
    content: "hello from {{ inventory_hostname }}\\n"
    dest: /etc/hello
    mode: "0644"
"""
VERIFY = """\
- name: Verify
  hosts: all
  gather_facts: false
  tasks:
    - name: Read the file the role wrote
      ansible.builtin.slurp:
        src: /etc/hello
      register: hello
    - name: It names the host
      ansible.builtin.assert:
        that: (hello.content | b64decode) == 'hello from ' ~ inventory_hostname ~ '\\n'
"""
CONVERGE = """\
- name: Converge
  hosts: all
  gather_facts: false
  roles:
    - hello
"""


def write_role(root: Path, platforms: list[dict]) -> Path:
    """roles/hello with a default scenario using the plugin; returns the role's directory."""
    role = root / "roles" / "hello"
    (role / "tasks").mkdir(parents=True)
    (role / "tasks" / "main.yml").write_text(TASKS)
    scenario = role / "molecule" / "default"
    scenario.mkdir(parents=True)
    (scenario / "converge.yml").write_text(CONVERGE)
    (scenario / "verify.yml").write_text(VERIFY)
    (scenario / "molecule.yml").write_text(yaml.safe_dump({
        "driver": {"name": "molecule-pymachine"},
        "platforms": platforms,
        "provisioner": {"name": "ansible", "env": {"ANSIBLE_ROLES_PATH": str(root / "roles")}},
        "verifier": {"name": "ansible"},
    }))
    return role


@pytest.fixture
def project(tmp_path: Path):
    """A user's project: a role, a scenario of two local machines, molecule's environment, and a check that
    nothing is left at the end (molecule destroy runs as a last resort)."""
    ephemeral = tmp_path / "ephemeral"
    role = write_role(tmp_path, [{"name": "hello-a"}, {"name": "hello-b"}])
    with contextlib.contextmanager(machine_cli)(ephemeral / "pymachine") as cli:
        env = scenario_env(cli, tmp_path)

        def molecule(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            proc = subprocess.run(["molecule", *args], cwd=role, env=env, capture_output=True, text=True,
                                  timeout=900)
            proc.stdout = ANSI.sub("", proc.stdout + proc.stderr)
            if check:
                assert proc.returncode == 0, proc.stdout[-5000:]
            return proc

        yield cli, molecule, role, env
        molecule("destroy", check=False)


def test_a_role_of_ones_own_passes_molecule_test_on_two_local_machines(project):
    cli, molecule, _, _ = project
    log = molecule("test").stdout
    for step in ("create", "converge", "idempotence", "verify", "destroy"):
        assert re.search(rf"\b{step}(:|\]) Executed: Successful", log), f"molecule did not run {step}:\n{log[-3000:]}"
    assert "hello-a" in log and "hello-b" in log
    assert cli("ls", "-q").stdout == ""
    assert bridge_leftovers() == []


def kill_tree(root: int) -> None:
    """SIGKILL a process and everything it started. Not its process group: ansible's workers call setsid, so the
    driver's `create` would go on making machines while destroy removes them. Stopped first, so none forks after
    the tree was read."""
    stopped: set[int] = set()
    while new := ({root} | descendants(root)) - stopped:
        for pid in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(
                int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def test_destroy_after_an_interrupted_create_leaves_nothing(project):
    cli, _, role, env = project
    create = subprocess.Popen(["molecule", "create"], cwd=role, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Kill it mid-create: once the first machine has its address and UID range but is not booted yet.
        deadline = time.monotonic() + 300
        journal = cli.home / "machines" / "hello-a" / "journal"
        while not journal.exists() or len(journal.read_text().splitlines()) < 4:
            assert create.poll() is None and time.monotonic() < deadline, "create ended before making a machine"
            time.sleep(0.02)
    finally:
        kill_tree(create.pid)
        create.wait()
    record = journal_record(cli, "hello-a")
    proc = subprocess.run(["molecule", "destroy"], cwd=role, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert cli("ls", "-q").stdout == ""
    assert leftovers(record, cli.home / "machines" / "hello-a") == []
    assert bridge_leftovers() == []


def test_a_platform_pymachine_cannot_make_is_refused_in_one_line(tmp_path: Path):
    """Through molecule itself (the driver's sanity check); tests/unit/test_molecule_platforms.py has the cases."""
    role = write_role(tmp_path, [{"name": "bad", "options": {"local-isolaton": "privileged"}}])
    with contextlib.contextmanager(machine_cli)(tmp_path / "ephemeral" / "pymachine") as cli:
        env = scenario_env(cli, tmp_path)
        proc = subprocess.run(["molecule", "create"], cwd=role, env=env, capture_output=True, text=True, timeout=300)
        out = ANSI.sub("", proc.stdout + proc.stderr)
        assert proc.returncode != 0
        lines = [line for line in out.splitlines() if "molecule-pymachine:" in line]
        assert len(lines) == 1 and "platform bad: --local-isolaton is not an option" in lines[0], out[-3000:]
        assert "Traceback" not in out
        assert not (cli.home / "machines").exists() or cli("ls", "-q").stdout == ""


def test_destroy_stops_a_create_that_outlived_its_molecule(project, tmp_path: Path):
    """Killed, molecule leaves its create running (Ansible's worker has a session of its own): destroy must stop it,
    not remove what is there now while it goes on making the next platform."""
    cli, _, _, env = project
    driver = [str(VENV_BIN / "python"), "-m", "machine.molecule_driver"]
    env = {**env, "MOLECULE_INSTANCE_CONFIG": str(tmp_path / "instance_config.yml")}
    platforms = json.dumps([{"name": "hello-a"}, {"name": "hello-b"}])
    create = subprocess.Popen([*driver, "create"], env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        create.stdin.write(platforms)
        create.stdin.close()
        journal = cli.home / "machines" / "hello-a" / "journal"
        deadline = time.monotonic() + 300
        while not journal.exists() or len(journal.read_text().splitlines()) < 4:
            assert create.poll() is None and time.monotonic() < deadline, "create ended before making a machine"
            time.sleep(0.02)
        record = journal_record(cli, "hello-a")
        destroy = subprocess.run([*driver, "destroy"], env=env, capture_output=True, text=True, timeout=600)
        assert destroy.returncode == 0, destroy.stderr
        create.wait(timeout=300)
    finally:
        if create.poll() is None:
            create.kill()
        create.wait()
    assert cli("ls", "-q").stdout == ""  # was: hello-b, made after destroy
    assert leftovers(record, cli.home / "machines" / "hello-a") == []
    assert bridge_leftovers() == []
    assert "stopping the create still running" in destroy.stderr
    # It rolled back the machine it was making, as a create stopped by SIGTERM does.
    assert create.returncode == 128 + signal.SIGTERM and "terminated (SIGTERM)" in create.stderr.read()


def test_destroy_removes_the_machines_whatever_the_platforms_say_now(project):
    """A platform edited into one pymachine cannot make (a typo) is refused by create, never by destroy: it would
    leave the machines made before the edit running."""
    cli, molecule, role, _ = project
    molecule("create")
    assert sorted(cli("ls", "-q").stdout.split()) == ["hello-a", "hello-b"]
    scenario = role / "molecule" / "default" / "molecule.yml"
    config = yaml.safe_load(scenario.read_text())
    config["platforms"][0]["options"] = {"local-isolaton": "privileged"}
    scenario.write_text(yaml.safe_dump(config))
    molecule("destroy")  # was: "molecule-pymachine: platform hello-a: --local-isolaton is not an option", exit 1
    assert cli("ls", "-q").stdout == ""
    assert bridge_leftovers() == []
