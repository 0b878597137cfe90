"""The built-in roles' read-only probes, rendered from the role files as the play renders them and run by a real
shell: each must tell a present thing from a missing one (a no-op run ends at these checks)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from machine.paths import roles_dir
from machine.roles.templating import Templar


def probe(role: str, name: str, variables: dict) -> str:
    """The shell script of the task `name` in `role`'s tasks, templated with `variables`."""
    tasks = yaml.safe_load((roles_dir() / role / "tasks" / "main.yml").read_text())
    found = [t for t in _flatten(tasks) if t.get("name") == name]
    assert len(found) == 1, f"{role}: no single task named {name!r}"
    return Templar().template(found[0]["ansible.builtin.shell"], variables)


def _flatten(tasks: list[dict]) -> list[dict]:
    return [t for task in tasks for t in (task, *_flatten(task.get("block", [])))]


def run(script: str, path: Path | None = None) -> int:
    """The script's exit status; with `path`, the programs it finds are only those there."""
    env = {"PATH": str(path) if path else "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True).returncode


@pytest.fixture
def iptables(tmp_path: Path):
    """fake(output, rc): a directory whose only program, `iptables`, prints `output` and exits `rc`."""
    def fake(output: str, rc: int = 0) -> Path:
        script = tmp_path / "iptables"
        script.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {rc}\n")
        script.chmod(0o755)
        return tmp_path
    return fake


@pytest.mark.parametrize(("rules", "rc", "expected"), [
    ("-P POSTROUTING ACCEPT\n-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n", 0, 0),
    # Another subnet's rule, and this subnet's rule with another target, are not it.
    ("-P POSTROUTING ACCEPT\n-A POSTROUTING -s 172.18.0.0/16 ! -o br0 -j MASQUERADE\n"
     "-A POSTROUTING -s 172.17.0.0/16 -j ACCEPT\n", 0, 1),
    ("", 3, 2),  # iptables itself failed
], ids=["masqueraded", "not-masqueraded", "iptables-failed"])
def test_the_nat_probe_finds_the_bridge_subnet_masqueraded(iptables, rules, rc, expected):
    script = probe("bridge", "Read the NAT rules", {"bridge_ipam": {"stdout": "172.17.0.0/16 172.17.0.1"}})
    assert run(script, iptables(rules, rc)) == expected


def test_the_module_probe_finds_a_filesystem_module_without_a_program():
    # A filesystem the kernel has without a /sys/module entry (built in), found with no program on PATH.
    builtin = next(name for name in (line.split()[-1] for line in Path("/proc/filesystems").read_text().splitlines())
                   if not Path("/sys/module", name).exists())
    variables = {"kernel_module_probes": {}}
    assert run(probe("kernel", "Check which kernel modules are present", {**variables, "item": builtin}),
               Path("/nonexistent")) == 0
    # Without /sys/module/<name>, /proc/modules, the filesystem or the kernel's builtin list, it is missing.
    assert run(probe("kernel", "Check which kernel modules are present",
                     {**variables, "item": "pm_no_such_module"})) == 1
