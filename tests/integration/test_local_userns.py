"""The local driver's isolation modes with real machines: a user-namespaced machine (the default) runs as a range
of unprivileged host UIDs leased to it alone, stores its files in that range and gives the range back on rm;
`--local-isolation privileged` is the machine whose root is the host's root; what userns cannot host is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from machine.drivers.local import userns
from tests.conftest import CLI
from tests.integration.conftest import CACHE, bridge_leftovers, leftovers, machine_record
from tests.integration.test_journal import assert_one_line, journal_record, kill_at

pytestmark = pytest.mark.integration


def range_owners() -> list[str]:
    try:
        return list(json.loads((userns.STATE_DIR / "leases.json").read_text())["leases"].values())
    except FileNotFoundError:
        return []


def host_ids(pid: int) -> set[int]:
    """Every host UID and GID (real, effective, saved, filesystem) of a process; none once it has exited."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return set()
    return {int(v) for line in lines if line.startswith(("Uid:", "Gid:")) for v in line.split()[1:]}


def machine_processes(record: dict) -> dict[int, str]:
    """{pid: command} of the processes in the machine's cgroups that run inside it (its own PID namespace)."""
    host = os.readlink("/proc/self/ns/pid")
    found = {}
    for top in record["resources"]["cgroups"]:
        for dirpath, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                for pid in map(int, Path(dirpath, "cgroup.procs").read_text().split()):
                    try:
                        if os.readlink(f"/proc/{pid}/ns/pid") != host:
                            found[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
                    except OSError:
                        pass  # gone meanwhile
    return found


def assert_in_its_range(cli: CLI, name: str) -> tuple[int, int]:
    """The machine's processes all run as host UIDs of its leased range; its files are stored in it."""
    record = machine_record(cli, name)
    shift, count = record["resources"]["uid_range"]
    assert count == 65536 and shift >= 0x80000 and shift % 65536 == 0
    assert cli("ssh", name, "--", "cat /proc/self/uid_map").stdout.split() == ["0", str(shift), "65536"]
    processes = machine_processes(record)
    assert "systemd" in processes.values() and "sshd" in processes.values(), processes
    for pid, command in processes.items():
        ids = host_ids(pid)
        assert all(shift <= i < shift + count for i in ids), f"{command} ({pid}) runs as host ids {ids}"
    machine_dir = cli.home / "machines" / name
    upper = machine_dir / "layer/upper"
    assert (upper.stat().st_uid, (upper / "etc/hostname").stat().st_uid) == (shift, shift)
    for volume in ("docker", "containers"):
        assert (machine_dir / "layer/volumes" / volume).stat().st_uid == shift
    base = Path(record["resources"]["base"])
    assert (base / "etc/passwd").stat().st_uid == 0  # the shared base is seen shifted, never chowned
    assert str(machine_dir) in range_owners()
    return shift, count


def test_a_machine_runs_as_its_own_unprivileged_uids_and_rm_gives_them_back(local):
    local("create", "--no-provision", "u")
    shift, _ = assert_in_its_range(local, "u")
    # What root makes in the machine is stored as the machine's root, setuid bits and all, not as the host's.
    local("ssh", "u", "--", "cp /bin/true /root/suid && chmod 4755 /root/suid && touch /var/lib/docker/made")
    machine_dir = local.home / "machines/u"
    made = (machine_dir / "layer/upper/root/suid").stat()
    assert (made.st_uid, made.st_mode & 0o7777) == (shift, 0o4755)
    assert (machine_dir / "layer/volumes/docker/made").stat().st_uid == shift
    # FUSE works for the machine's root through a node of its own (the host's /dev/fuse is root's alone).
    assert local("ssh", "u", "--", "test -r /dev/fuse -a -w /dev/fuse && echo ok").stdout.strip() == "ok"

    local("restart", "u")
    assert assert_in_its_range(local, "u")[0] == shift  # the range is the machine's for life
    assert local("ssh", "u", "--", "stat -c %u /root/suid").stdout.strip() == "0"

    record = machine_record(local, "u")
    local("rm", "-y", "u")
    assert str(machine_dir) not in range_owners()
    assert leftovers(record, machine_dir) == [] and bridge_leftovers() == []


def test_two_machines_never_share_a_range(local):
    local("create", "--no-provision", "a")
    local("create", "--no-provision", "b")
    first_a = machine_record(local, "a")["resources"]["uid_range"][0]
    first_b = machine_record(local, "b")["resources"]["uid_range"][0]
    assert abs(first_a - first_b) >= 65536


def test_privileged_is_a_machine_whose_root_is_the_hosts(local):
    local("create", "--no-provision", "--local-isolation", "privileged", "p")
    record = machine_record(local, "p")
    assert record["options"]["local_isolation"] == "privileged" and "uid_range" not in record["resources"]
    assert local("ssh", "p", "--", "cat /proc/self/uid_map").stdout.split() == ["0", "0", "4294967295"]
    assert local("ssh", "p", "--", "test -c /dev/loop-control && echo ok").stdout.strip() == "ok"
    assert str(local.home / "machines/p") not in range_owners()


def test_a_create_killed_once_its_range_is_journaled_is_removed_with_its_lease(local):
    kill_at(local, "k", 4)  # identity, base, address, UID range
    record = journal_record(local, "k")
    shift = record["resources"]["uid_range"][0]
    machine_dir = local.home / "machines/k"
    assert str(machine_dir) in range_owners()
    # Only the journal is left to tell: ls reports the held range, and rm -f finds it from the journal.
    (machine_dir / "config.json").unlink()
    [row] = json.loads(local("ls", "--format", "json").stdout)
    assert f"UID range {shift}-{shift + 65535}" in row["error"], row
    proc = local("rm", "-f", "k", check=False)
    assert proc.returncode == 0, proc.stderr
    assert str(machine_dir) not in range_owners()
    assert leftovers(record, machine_dir) == [] and bridge_leftovers() == []


@pytest.mark.parametrize("flags", [
    ["--engine-storage-driver", "btrfs"],
    ["--engine-storage-driver", "zfs", "--no-provision"],
    ["--engine-storage-driver", "btrfs", "--engine-storage-device", "/dev/vdb"],
])
def test_userns_refuses_loop_and_block_storage_up_front_in_one_line(local, flags):
    proc = local("create", *flags, "w", check=False)
    assert proc.returncode == 2
    assert_one_line(proc)
    assert "--local-isolation userns" in proc.stderr and "add --local-isolation privileged" in proc.stderr
    assert not (local.home / "machines").exists() or not list((local.home / "machines").iterdir())


def test_a_base_on_a_filesystem_without_idmapped_mounts_is_one_clear_error(local, tmp_path):
    """As when pymachine itself runs in a container: the image cache is on an overlayfs, which cannot be idmapped."""
    cache, upper, work = tmp_path / "cache", tmp_path / "upper", tmp_path / "work"
    for directory in (cache, upper, work):
        directory.mkdir()
    overlay = f"mount -t overlay pmtest -o lowerdir={CACHE},upperdir={upper},workdir={work} {cache}"
    local.env["PYMACHINE_CACHE"] = str(cache)
    # The overlay exists only in a private mount namespace that pymachine runs in, and goes away with it.
    proc = local.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{overlay} && exec "$@"', "sh"],
                     "create", "--no-provision", "nfs")
    assert proc.returncode == 1
    assert_one_line(proc)
    assert "cannot idmap the base image" in proc.stderr and "--local-isolation privileged" in proc.stderr
    assert not list((local.home / "machines").iterdir())  # rolled back
    assert str(local.home / "machines/nfs") not in range_owners() and bridge_leftovers() == []
