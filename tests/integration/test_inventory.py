"""`pymachine inventory` drives real Ansible (ansible-core from the project's venv) against real machines."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI
from tests.integration.conftest import machine_cli

pytestmark = pytest.mark.integration

# ansible-core is in the `test` extra: it runs from the same venv as pytest.
VENV_BIN = Path(sys.executable).parent


def ansible_env(cli: CLI, tmp: Path) -> dict[str, str]:
    """The CLI's environment (its pymachine home) for Ansible's commands, with Ansible's state kept in `tmp`."""
    if not (VENV_BIN / "ansible-playbook").exists():
        pytest.fail(f"ansible-core is not installed in {VENV_BIN} (install pymachine with the `test` extra)")
    return {
        **cli.env,
        "PATH": f"{VENV_BIN}:{cli.env.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"),
        "ANSIBLE_HOME": str(tmp / "ansible-home"),
        # Short: ssh refuses ControlPath sockets longer than ~100 characters.
        "ANSIBLE_SSH_CONTROL_PATH_DIR": f"/tmp/pm-cp-{tmp.name[-12:]}",
        "ANSIBLE_RETRY_FILES_ENABLED": "false",
        "ANSIBLE_NOCOLOR": "1",
    }


def run(argv: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv[0]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Iterator[CLI]:
    yield from machine_cli(tmp_path_factory.mktemp("inventory") / "home")


@pytest.fixture(scope="module")
def machines(cli) -> list[str]:
    names = ["inv1", "inv2"]
    for name in names:
        cli("create", "--no-provision", name)
    return names


def test_ansible_pings_every_machine_through_process_substitution(cli, machines, tmp_path):
    # Exactly what the README tells users to type, including bash's <( ): the static YAML on a pipe
    # (ansible_env puts the venv's bin, with the `pymachine` entry point, first on PATH).
    proc = run(["bash", "-c", "ansible -i <(pymachine inventory) all -m ping"], ansible_env(cli, tmp_path))
    replies = re.findall(r"^(\S+) \| SUCCESS => (\{.*?^\})$", proc.stdout, re.M | re.S)
    pongs = {host: json.loads(body).get("ping") for host, body in replies}
    assert pongs == dict.fromkeys(machines, "pong"), proc.stdout


def test_pymachine_is_a_dynamic_inventory_script(cli, machines, tmp_path):
    script = tmp_path / "pymachine-inventory"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -m machine inventory "$@"\n')
    script.chmod(0o755)
    env = ansible_env(cli, tmp_path)

    listed = json.loads(run(["ansible-inventory", "-i", str(script), "--list"], env).stdout)
    assert sorted(listed["pymachine_local"]["hosts"]) == machines
    for name in machines:
        assert listed["_meta"]["hostvars"][name]["ansible_host"] == cli("ip", name).stdout.strip()
        # The protocol's other call (Ansible makes it only when --list has no _meta): one host's variables.
        host = json.loads(run([str(script), "--host", name], env).stdout)
        assert host == listed["_meta"]["hostvars"][name]

    # The variables are enough to reach each machine (key, user, pinned host key): ask each for its hostname.
    proc = run(["ansible", "-i", str(script), "pymachine_local", "-m", "command", "-a", "hostname"], env)
    for name in machines:
        assert re.search(rf"^{name} \| CHANGED \| rc=0 >>\n{name}$", proc.stdout, re.M), proc.stdout
