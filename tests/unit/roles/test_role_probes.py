"""The built-in roles' read-only probes, rendered from the role files as the play renders them and run by a real
shell: each must tell a present thing from a missing one (a no-op run ends at these checks)."""

from __future__ import annotations

import re
import shutil
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


def run_out(script: str, path: Path | None = None) -> tuple[int, str]:
    """The script's exit status and output; with `path`, the programs it finds are only those there."""
    env = {"PATH": str(path) if path else "/usr/sbin:/usr/bin:/sbin:/bin"}
    proc = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout


def run(script: str, path: Path | None = None) -> int:
    return run_out(script, path)[0]


@pytest.fixture
def programs(tmp_path: Path):
    """fake(**outputs): a directory whose programs are `cat` and, for each name=(output, rc), a program of that
    name printing `output` and exiting `rc`."""
    (tmp_path / "cat").symlink_to(shutil.which("cat"))

    def fake(**outputs: tuple[str, int]) -> Path:
        for name, (output, rc) in outputs.items():
            script = tmp_path / name
            script.write_text(f"#!/bin/sh\nprintf '%s' '{output}'\nexit {rc}\n")
            script.chmod(0o755)
        return tmp_path
    return fake


ROUTE = ("172.17.0.0/16 proto kernel scope link src 172.17.0.1 linkdown\n", 0)
BRIDGE_PROBE = "Read the default bridge, its NAT rule and IPv4 forwarding"

@pytest.mark.parametrize(("rules", "rc", "nat"), [
    ("-P POSTROUTING ACCEPT\n-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE\n", 0, "masqueraded"),
    # Another subnet's rule, and this subnet's rule with another target, are not it.
    ("-P POSTROUTING ACCEPT\n-A POSTROUTING -s 172.18.0.0/16 ! -o br0 -j MASQUERADE\n"
     "-A POSTROUTING -s 172.17.0.0/16 -j ACCEPT\n", 0, "missing"),
    ("", 3, "unreadable"),  # iptables itself failed
], ids=["masqueraded", "not-masqueraded", "iptables-failed"])
def test_the_bridge_probe_finds_the_subnet_masqueraded(programs, tmp_path, rules, rc, nat):
    forwarding = tmp_path / "ip_forward"
    forwarding.write_text("1\n")
    script = probe("bridge", BRIDGE_PROBE, {"bridge_settings": {"iptables": True, "ip_forward": True}})
    script = script.replace("/proc/sys/net/ipv4/ip_forward", str(forwarding))
    assert run_out(script, programs(ip=ROUTE, iptables=(rules, rc))) == (0, f"172.17.0.0/16 172.17.0.1 {nat} 1\n")


def test_the_bridge_probe_reads_only_what_the_settings_check(programs):
    script = probe("bridge", BRIDGE_PROBE, {"bridge_settings": {"iptables": False, "ip_forward": False}})
    assert run_out(script, programs(ip=ROUTE)) == (0, "172.17.0.0/16 172.17.0.1 unchecked unchecked\n")
    # A route without the bridge's address: "-" stands for it (and fails the engine_bip check).
    assert run_out(script, programs(ip=("172.17.0.0/16 proto kernel scope link linkdown\n", 0))) == \
        (0, "172.17.0.0/16 - unchecked unchecked\n")
    # No docker0 route: the engine has no bridge.
    assert run_out(script, programs(ip=("", 0)))[0] == 1


KERNEL_PROBE = "Detect whether the host is a container and which kernel modules are missing"


def test_the_kernel_probe_finds_a_filesystem_module_without_a_program():
    # A filesystem the kernel has without a /sys/module entry (built in), found with no program on PATH.
    builtin = next(name for name in (line.split()[-1] for line in Path("/proc/filesystems").read_text().splitlines())
                   if not Path("/sys/module", name).exists())
    variables = {"kernel_module_probes": {}, "kernel_modules": [builtin]}
    # The first line is this host's kind of container (or none); the missing modules follow it.
    rc, out = run_out(probe("kernel", KERNEL_PROBE, variables), Path("/nonexistent"))
    assert (rc, out.splitlines()[1:]) == (0, []) and out.splitlines()[0]
    # Without /sys/module/<name>, /proc/modules, the filesystem or the kernel's builtin list, it is missing;
    # a path proving a module's function is there is enough.
    variables = {"kernel_module_probes": {"pm_proven": "/proc/self"},
                 "kernel_modules": ["pm_no_such_module", builtin, "pm_proven", "pm-no-such-either"]}
    rc, out = run_out(probe("kernel", KERNEL_PROBE, variables))
    assert (rc, out.splitlines()[1:]) == (0, ["pm_no_such_module", "pm-no-such-either"])


@pytest.fixture
def sysctls(tmp_path: Path):
    """apply(values, in_container=False, check=False): the kernel role's sysctl task run on a copy of /proc/sys
    under tmp_path (a directory stands for a key the kernel will not let be written); (rc, stdout, stderr)."""
    tree = tmp_path / "sys"

    def apply(values: dict, in_container: bool = False, check: bool = False) -> tuple[int, str, str]:
        variables = {"kernel_sysctls": values, "kernel_in_container": in_container, "ansible_check_mode": check}
        script = probe("kernel", "Apply sysctls", variables).replace("/proc/sys/", f"{tree}/")
        proc = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True)
        # Less cat's complaint that the directory standing for a read-only key is not a file.
        err = "".join(line for line in proc.stderr.splitlines(keepends=True) if not line.startswith("cat: "))
        return proc.returncode, proc.stdout, err

    def key(name: str, value: str | None) -> Path:
        path = tree / name.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            path.mkdir()
        else:
            path.write_text(value)
        return path

    apply.key = key
    return apply


def test_the_sysctl_task_sets_what_differs_in_one_command(sysctls):
    forward = sysctls.key("net.ipv4.ip_forward", "0\n")
    rmem = sysctls.key("net.ipv4.tcp_rmem", "4096\t87380  6291456\n")
    values = {"net.ipv4.ip_forward": 1, "net.ipv4.tcp_rmem": "4096 87380 6291456"}
    assert sysctls(values, check=True) == (0, "changed net.ipv4.ip_forward\n", "")
    assert forward.read_text() == "0\n"  # check mode writes nothing
    assert sysctls(values) == (0, "changed net.ipv4.ip_forward\n", "")
    assert forward.read_text() == "1\n" and rmem.read_text() == "4096\t87380  6291456\n"
    assert sysctls(values) == (0, "", "")  # whitespace apart, the values are as wanted


def test_the_sysctl_task_fails_on_a_missing_or_read_only_key(sysctls):
    sysctls.key("net.bridge.bridge-nf-call-iptables", None)
    sysctls.key("vm.swappiness", None)
    bridge = {"net.bridge.bridge-nf-call-iptables": 1}
    # A container may not write the host kernel's bridge keys: said, and not a failure.
    assert sysctls(bridge, in_container=True) == (0, "readonly net.bridge.bridge-nf-call-iptables\n", "")
    assert sysctls(bridge) == (1, "", "sysctl net.bridge.bridge-nf-call-iptables is read-only here\n")
    assert sysctls({"vm.swappiness": 10}, in_container=True) == (1, "", "sysctl vm.swappiness is read-only here\n")
    rc, out, err = sysctls({"net.ipv4.no_such_key": 1, "net.bridge.bridge-nf-call-iptables": 1}, in_container=True)
    assert (rc, out) == (1, "readonly net.bridge.bridge-nf-call-iptables\n")
    assert err.startswith("sysctl net.ipv4.no_such_key does not exist (")


def test_tasks_writing_a_private_key_hide_it_from_diff_and_output():
    writers = []
    for path in sorted(roles_dir().glob("*/tasks/*.yml")):
        for task in _flatten(yaml.safe_load(path.read_text()) or []):
            content = str((task.get("ansible.builtin.copy") or {}).get("content", ""))
            if re.search(r"\w+_key\b", content):
                writers.append((path.parent.parent.name, task["name"], task.get("no_log")))
    assert writers == [("registry", "Registry key", True), ("tls", "TLS server key", True)]
