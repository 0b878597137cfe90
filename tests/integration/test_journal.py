"""The journal under faults, with real local machines: a create killed at every step, damaged records, and many
commands at once on one store. Whatever happens, `rm -f` leaves nothing, and no command shows a traceback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from machine.store import Store
from tests.conftest import CLI
from tests.integration.conftest import (
    bridge_leftovers,
    damage_record,
    journal_record,
    kill_create_at,
    leftovers,
    machine_cli,
    machine_record,
    ssh_masters,
)

pytestmark = pytest.mark.integration

# The journal lines a local create writes: identity, base image, address, UID range, cgroups, supervisor.
LOCAL_STEPS = 6


def kill_at(cli: CLI, name: str, lines: int) -> None:
    kill_create_at(cli, name, lines, "--no-provision")


def assert_one_line(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pymachine: "), proc.stderr


@pytest.mark.parametrize("step", range(1, LOCAL_STEPS + 1))
def test_a_create_killed_at_any_step_is_removed_without_a_trace(local, step):
    name = f"k{step}"
    kill_at(local, name, step)
    record = journal_record(local, name)
    machine_dir = local.home / "machines" / name
    # Never finished, whether or not its host runs (the last step boots it): ls, status and inspect agree.
    [row] = json.loads(local("ls", "--format", "json").stdout)
    interrupted = f"its create was interrupted: `pymachine rm -f {name}` removes what it made"
    assert (row["state"], row["error"]) == ("Error", interrupted), row
    assert local("status", name).stdout.strip() == "Error"
    inspected = json.loads(local("inspect", name).stdout)
    assert (inspected["state"], inspected["error"]) == ("Error", interrupted)
    proc = local("rm", "-f", name, check=False)
    assert proc.returncode == 0, proc.stderr
    assert leftovers(record, machine_dir) == []
    assert not list((local.home / "machines").iterdir())  # no staging or trash directory either
    assert bridge_leftovers() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_create_terminated_midway_rolls_back_as_ctrl_c_does(local, sig):
    """SIGTERM (`timeout`, a CI job cancelled, systemd) and SIGHUP (a closed terminal) are Ctrl-C: the create rolls
    back and says so, with the shell's status of that signal."""
    name = f"s{sig}"
    journal = local.home / "machines" / name / "journal"
    proc = local.popen("create", "--no-provision", name)
    while not journal.exists() or len(journal.read_text().splitlines()) < LOCAL_STEPS - 1:  # before the boot
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.001)
    record = journal_record(local, name)
    # Still being made (its create holds the lock, and boots it meanwhile): nothing wrong with it.
    [row] = json.loads(local("ls", "--format", "json").stdout)
    assert row["state"] in ("Starting", "Running") and row["error"] == "", row
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stderr.split()) == (128 + sig, ["pymachine:", "terminated", f"({sig.name})"])
    assert leftovers(record, journal.parent) == []
    assert local("ls", "-q").stdout == ""


DAMAGE = {
    "empty": "",
    "truncated": '{"na',
    "a list": "[]",
    "no id": '{"name": "d", "driver": "local"}',
    "wrong types": '{"name": "d", "driver": "local", "id": "x", "resources": "none"}',
    "missing": None,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_record_gives_one_line_everywhere_and_rm_f_removes_everything(local, damage):
    local("create", "--no-provision", "d")
    record = machine_record(local, "d")
    damage_record(local, "d", DAMAGE[damage])
    commands = (["status"], ["ip"], ["url"], ["inspect"], ["env"], ["config"], ["start"], ["stop"], ["kill"],
                ["restart"], ["provision"], ["regenerate-certs"], ["upgrade"], ["ssh"], ["rm", "-y"])
    with ThreadPoolExecutor(len(commands)) as pool:
        for command, proc in zip(commands, pool.map(lambda argv: local(*argv, "d", check=False), commands),
                                 strict=True):
            assert proc.returncode == 1, (command, proc.stderr)
            assert_one_line(proc)
    listed = local("ls", "--format", "json")
    [row] = json.loads(listed.stdout)
    assert row["state"] == "Error" and f"{len(record['resources']['cgroups'])} cgroups" in row["error"], row
    assert_one_line(local("inventory", check=False))
    # The machine still runs: nothing above took it down, and its address is still its own.
    assert leftovers(record, local.home / "machines/d") != []
    proc = local("rm", "-f", "d", check=False)
    assert proc.returncode == 0, proc.stderr
    assert leftovers(record, local.home / "machines/d") == []
    assert bridge_leftovers() == []


def test_rm_keeps_the_record_while_something_is_left(local):
    """A cgroup that cannot be removed (something is mounted on a child of it) keeps the record, and rm says so."""
    local("create", "--no-provision", "--local-isolation", "privileged", "--engine-install", "distro",
          "--engine-storage-driver", "btrfs", "held")
    record = machine_record(local, "held")
    # The engine options of a create without provisioning are kept for a later `provision`.
    assert (record["engine"]["engine_install"], record["engine"]["engine_storage_driver"]) == ("distro", "btrfs")
    busy = Path(record["resources"]["cgroups"][0]) / "busy"
    busy.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "busy", str(busy)], check=True)
    try:
        proc = local("rm", "-f", "held", check=False)
        assert proc.returncode == 1 and "left: 1 cgroups" in proc.stderr and "record is kept" in proc.stderr
        assert_one_line(proc)
        [row] = json.loads(local("ls", "--format", "json").stdout)
        assert row["state"] == "Stopped" and row["error"] == f"left: 1 cgroups (pymachine/{record['id']})"
    finally:
        subprocess.run(["umount", str(busy)], check=True)
    local("rm", "-f", "held")
    assert leftovers(record, local.home / "machines/held") == []


def test_twenty_commands_at_once_on_one_store(local, quick_roles):
    """Creates, ls, provision and rm of the same and of different machines: no corrupt record, no lost update,
    no address given twice, no traceback."""
    local.env["PYMACHINE_ROLES_PATH"] = str(quick_roles)
    for name in ("p1", "p2", "r1", "r2"):
        local("create", "--no-provision", name)
    before = {name: machine_record(local, name) for name in ("p1", "p2")}
    commands = [
        *(["create", "--no-provision", f"c{i}"] for i in range(6)),
        ["create", "--no-provision", "same"], ["create", "--no-provision", "same"],
        *(["ls"] for _ in range(4)),
        ["provision", "p1"], ["provision", "p1"], ["provision", "p2"], ["provision", "p2"],
        ["rm", "-y", "r1"], ["rm", "-y", "r1"], ["rm", "-y", "r2"], ["rm", "-y", "r2"],
    ]
    assert len(commands) == 20
    with ThreadPoolExecutor(len(commands)) as pool:
        results = list(pool.map(lambda argv: (argv, local(*argv, check=False, timeout=300)), commands))
    for argv, proc in results:
        assert_one_line(proc)
        assert proc.returncode == 0 or argv[0] in ("create", "rm"), (argv, proc.stderr)
    outcomes = {tuple(argv): [] for argv, _ in results}
    for argv, proc in results:
        outcomes[tuple(argv)].append(proc.returncode)
    # Of two creates of one name and two removals of one machine, exactly one succeeds.
    assert sorted(outcomes[("create", "--no-provision", "same")]) == [0, 2]  # 2: the name is taken
    assert sorted(outcomes[("rm", "-y", "r1")]) == [0, 1] and sorted(outcomes[("rm", "-y", "r2")]) == [0, 1]
    assert all(rc == [0] for argv, rc in outcomes.items() if argv[:2] == ("create", "--no-provision")
               and argv[2].startswith("c"))
    store = Store(local.home)
    names = store.names()
    assert sorted(names) == sorted([*(f"c{i}" for i in range(6)), "same", "p1", "p2"])
    addresses = [store.load(name).resources["ip"] for name in names]
    assert len(set(addresses)) == len(addresses)
    for name in ("p1", "p2"):
        after = store.load(name)
        # Both provisions ran, one after the other, and neither lost what create had recorded.
        assert after.state == "ready" and after.resources == before[name]["resources"]
        runs = local("ssh", name, "--", "grep", "-c", "kernel", "/root/provisioned").stdout.strip()
        assert runs == "2"
    status = {name: local("status", name).stdout.strip() for name in names}
    assert set(status.values()) == {"Running"}


@pytest.fixture
def full_home(tmp_path: Path) -> Iterator[Path]:
    """A small filesystem of its own (a tmpfs) for a home; `fill(home, kib)` leaves `kib` KiB free on it."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "pmsmall", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(mount: Path, kib: int) -> None:
    filler = mount / "filler"
    filler.unlink(missing_ok=True)
    free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize // 1024
    filler.write_bytes(b"\0" * (free - kib) * 1024)


@pytest.mark.parametrize("kib", [0, 24, 48])
def test_a_create_on_a_full_disk_names_the_file_and_leaves_nothing(full_home, kib):
    """Out of space as the create starts (0: its first journal line), or part way (its keys, its layer): one line
    naming the file, and nothing left, in the store or on the host."""
    with contextlib.contextmanager(machine_cli)(full_home / "home") as cli:
        cli("ls")  # the home and its machines directory exist; only what a create writes is short of space
        fill(full_home, kib)
        proc = cli("create", "--no-provision", "full", check=False)
        assert proc.returncode == 1, proc.stderr
        assert_one_line(proc)
        assert re.fullmatch(f"pymachine: error: {full_home}/home/\\S+: No space left on device\n", proc.stderr)
        assert not list((cli.home / "machines").iterdir())  # no staging directory either
        assert bridge_leftovers() == []


def test_a_killed_rm_leaves_a_machine_shown_half_removed_that_only_rm_f_takes(local):
    """rm killed once it has started removing: never booted again (its address and image marks may be gone),
    shown as what it is, and `rm -f` finishes the job."""
    local("create", "--no-provision", "half")
    record = machine_record(local, "half")
    config = local.home / "machines/half/config.json"
    proc = local.popen("rm", "-y", "half")
    while json.loads(config.read_text())["state"] != "removing":
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    [row] = json.loads(local("ls", "--format", "json").stdout)
    interrupted = "its removal was interrupted: `pymachine rm -f half` finishes it"
    assert (row["state"], row["error"]) == ("Error", interrupted), row
    for command in ("start", "restart", "provision"):
        refused = local(command, "half", check=False)
        assert refused.returncode == 1 and refused.stderr.endswith(f" {interrupted}\n"), refused.stderr
        assert_one_line(refused)
    proc = local("rm", "-f", "half", check=False)
    assert proc.returncode == 0, proc.stderr
    assert leftovers(record, local.home / "machines/half") == []
    assert bridge_leftovers() == []


def test_a_create_killed_while_its_kept_ssh_connection_logs_in_leaves_no_ssh_behind(local):
    """Killed while the ssh that starts its kept connection waits for the machine's network: that ssh has no socket
    to be asked on yet, and outlived the create and the rm; rm -f ends it too."""
    machine_dir = local.home / "machines/sshkill"
    proc = local.popen("create", "--no-provision", "sshkill")
    while not ssh_masters(machine_dir):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    record = journal_record(local, "sshkill")
    proc = local("rm", "-f", "sshkill", check=False)
    assert proc.returncode == 0, proc.stderr
    assert leftovers(record, machine_dir) == []
