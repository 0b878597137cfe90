"""Local machines for real: systemd-nspawn, overlayfs, a host bridge with NAPT, SSH with pinned host keys."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from machine.commands import queries
from machine.drivers.local import cgroups
from machine.store import Store
from tests.integration.conftest import (
    BRIDGE,
    SUBNET,
    bridge_leftovers,
    leftovers,
    machine_cli,
    machine_record,
    ssh_masters,
)

pytestmark = pytest.mark.integration


def state(cli, name: str) -> str:
    return cli("status", name).stdout.strip()


def test_two_machines_from_create_to_rm(local, tmp_path):
    local("create", "--no-provision", "m1")
    local("create", "--no-provision", "m2")

    rows = json.loads(local("ls", "--format", "json").stdout)
    assert [(r["name"], r["driver"], r["state"]) for r in rows] == [
        ("m1", "local", "Running"), ("m2", "local", "Running"),
    ]
    ip1, ip2 = local("ip", "m1").stdout.strip(), local("ip", "m2").stdout.strip()
    assert ip1 != ip2 and ipaddress.ip_address(ip1) in ipaddress.ip_network(SUBNET)
    assert local("url", "m1").stdout.strip() == f"tcp://{ip1}:2376"
    assert [r["name"] for r in json.loads(local("ls", "--filter", "name=*2", "--format", "json").stdout)] == ["m2"]
    assert json.loads(local("inspect", "m1").stdout)["ssh"]["host"] == ip1
    # docker-machine's scripts keep working: its Go templates, its filter keys, --timeout.
    assert local("ls", "--format", "{{.Name}} {{.DriverName}} {{.State}} {{.URL}}").stdout.splitlines() == [
        f"m1 local Running tcp://{ip1}:2376", f"m2 local Running tcp://{ip2}:2376",
    ]
    assert local("inspect", "--format", "{{.Driver.IPAddress}} {{.Driver.SSHUser}}", "m1").stdout == f"{ip1} root\n"
    assert local("ls", "--filter", "driver=local", "--filter", "state=running", "-t", "10", "-q").stdout == "m1\nm2\n"

    # A real userland: systemd as PID 1, its own hostname, its own network, exit codes passed through.
    out = local("ssh", "m1", "--", "hostname; cat /proc/1/comm; systemctl is-system-running").stdout.split()
    assert out == ["m1", "systemd", "running"]
    assert local("ssh", "m1", "--", "exit 3", check=False).returncode == 3
    banner = local("ssh", "m1", "--", f"bash -c 'exec 3<>/dev/tcp/{ip2}/22; head -c 4 <&3'").stdout
    assert banner == "SSH-"
    # The engine installed later needs writable cgroup controllers of the machine's own.
    local("ssh", "m1", "--", "mkdir /sys/fs/cgroup/cpuset/probe && rmdir /sys/fs/cgroup/cpuset/probe")
    # The base is up to date for its /usr: no boot runs systemd's update units (sysusers delays sshd).
    assert local("ssh", "m1", "--", "systemctl show -P ConditionResult systemd-sysusers").stdout == "no\n"
    # Logins run no message-of-the-day scripts (pam_motd writes what they print to /run/motd.dynamic).
    assert local("ssh", "m1", "--", "ls /run/motd.dynamic", check=False).returncode != 0

    # scp both ways, files and directories.
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file.txt").write_text("payload\n")
    local("scp", "-r", str(tree), "m1:/root/")
    assert local("ssh", "m1", "--", "cat /root/tree/sub/file.txt").stdout == "payload\n"
    local("scp", "m1:/etc/hostname", str(tmp_path / "hostname"))
    assert (tmp_path / "hostname").read_text() == "m1\n"
    local("scp", "-r", "m1:/root/tree", str(tmp_path / "back"))
    assert (tmp_path / "back" / "sub" / "file.txt").read_text() == "payload\n"
    # -d copies only the files that differ in size, time or permissions (rsync's quick check), keeping their time:
    # a file changed behind its back with all three kept is left alone, a changed source is copied.
    local("scp", "-r", "-d", str(tree), "m1:/root/")
    f = "/root/tree/sub/file.txt"
    local("ssh", "m1", "--", f"cp -p {f} /tmp/t && printf 'PAYLOAD\\n' > {f} && touch -r /tmp/t {f}")
    local("scp", "-r", "-d", str(tree), "m1:/root/")
    assert local("ssh", "m1", "--", "cat /root/tree/sub/file.txt").stdout == "PAYLOAD\n"
    (tree / "sub" / "file.txt").write_text("payload 2\n")
    local("scp", "-r", "-d", "-q", str(tree), "m1:/root/")
    assert local("ssh", "m1", "--", "cat /root/tree/sub/file.txt").stdout == "payload 2\n"
    local("scp", "-d", "m1:/root/tree/sub/file.txt", str(tmp_path / "back"))
    assert (tmp_path / "back" / "file.txt").stat().st_mtime == int((tree / "sub" / "file.txt").stat().st_mtime)

    # mount: a machine's directory on the host with sshfs; -u takes it down, and so does rm (leftovers below).
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    local("mount", "m1:/root/tree", str(mnt))
    (mnt / "from-host").write_text("through sshfs\n")
    assert local("ssh", "m1", "--", "cat /root/tree/from-host").stdout == "through sshfs\n"
    local("mount", "-u", "m1:/root/tree", str(mnt))
    assert not mnt.is_mount() and list(mnt.iterdir()) == []
    local("mount", "m1:/root/tree", str(mnt))

    # Stop and start keep the address and the pinned host key.
    known_hosts = (local.home / "machines/m1/known_hosts").read_text()
    assert ssh_masters(local.home / "machines/m1"), "the connection is kept between commands"
    local("stop", "m1")
    assert state(local, "m1") == "Stopped"
    assert ssh_masters(local.home / "machines/m1") == [], "stop ends the kept connection"
    local("start", "m1")
    assert state(local, "m1") == "Running"
    assert local("ip", "m1").stdout.strip() == ip1
    assert (local.home / "machines/m1/known_hosts").read_text() == known_hosts
    assert local("ssh", "m1", "--", "cat /root/tree/sub/file.txt").stdout == "payload 2\n"  # the layer persists
    local("restart", "m1")
    assert state(local, "m1") == "Running"

    local("kill", "m2")
    assert state(local, "m2") == "Stopped"

    records = {name: machine_record(local, name) for name in ("m1", "m2")}
    local("rm", "-y", "m1")
    assert leftovers(records["m1"], local.home / "machines/m1") == []
    assert not mnt.is_mount()
    assert Path(f"/sys/class/net/{BRIDGE}").exists(), "the bridge stays while a machine uses it"
    local("rm", "-y", "m2")
    assert leftovers(records["m2"], local.home / "machines/m2") == []
    assert bridge_leftovers() == []
    assert local("ls", "-q").stdout.strip() == ""


def test_a_home_gone_by_hand_does_not_keep_the_bridge_up(local, tmp_path):
    with contextlib.contextmanager(machine_cli)(tmp_path / "other") as other:
        other("create", "--no-provision", "elsewhere")
        other("stop", "elsewhere")
        local("create", "--no-provision", "here")
        # The other home goes away (deleted, or on a filesystem not mounted now): its lease is nobody's.
        moved = other.home.rename(tmp_path / "moved")
        try:
            local("rm", "-y", "here")
            assert bridge_leftovers() == []
        finally:
            moved.rename(other.home)  # back, so that its machine is removed and its UID range released


def test_host_key_mismatch_is_refused(local):
    local("create", "--no-provision", "pinned")
    known_hosts = local.home / "machines/pinned/known_hosts"
    host, kind, _ = known_hosts.read_text().split()
    other = "AAAAC3NzaC1lZDI1NTE5AAAAIBHkFAlPqXKa0bPpCqAXgDEpAxDAMqz7TklIzXUaQDCs"
    known_hosts.write_text(f"{host} {kind} {other}\n")
    proc = local("scp", "pinned:/etc/hostname", "/dev/null", check=False)
    assert proc.returncode == 1 and "host key" in proc.stderr and "changed" in proc.stderr


def test_active_follows_docker_host(local):
    local("create", "--no-provision", "act")
    url = local("url", "act").stdout.strip()
    local.env["DOCKER_HOST"] = url
    assert local("active").stdout.strip() == "act"
    assert json.loads(local("ls", "--format", "json").stdout)[0]["active"] is True


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie has ended; its parent reaps it in its own time)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_nspawn(cli, name: str) -> list[int]:
    """SIGKILL the machine's systemd-nspawn (as the OOM killer would); its supervisor ends with it, and the
    processes of the machine left running are returned."""
    resources = machine_record(cli, name)["resources"]
    supervisor = resources["pid"]
    [nspawn] = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    os.kill(int(nspawn), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(supervisor):
        assert time.monotonic() < deadline, "the supervisor outlived its nspawn"
        time.sleep(0.05)
    return [int(pid) for cgroup in resources["cgroups"] for pid in Path(cgroup, "cgroup.procs").read_text().split()]


def test_a_machine_whose_nspawn_died_is_an_error_that_start_and_stop_end(local):
    local("create", "--no-provision", "orphan")
    left = kill_nspawn(local, "orphan")
    assert left, "the machine's systemd and sshd outlive nspawn"
    assert state(local, "orphan") == "Error"  # not Stopped: its sshd still answers on its address
    local("start", "orphan")  # boots it anew, once what was left is gone
    assert state(local, "orphan") == "Running"
    assert not [pid for pid in left if alive(pid)]
    assert local("ssh", "orphan", "--", "systemctl is-system-running --wait").stdout.strip() == "running"
    kill_nspawn(local, "orphan")
    local("stop", "orphan")
    assert state(local, "orphan") == "Stopped"
    record = machine_record(local, "orphan")
    local("rm", "-y", "orphan")
    assert leftovers(record, local.home / "machines/orphan") == []


def test_cgroups_are_made_while_the_last_other_machine_s_are_removed(tmp_path):
    """The rm of the last machine takes `pymachine/` away: a create making its cgroups below it at that moment
    makes it again rather than failing ("No such file or directory")."""
    scratch = Path(cgroups.paths("x")[0]).parents[1] / f"pmrace-{os.getpid()}"  # beside the machines' own
    scratch.mkdir()
    errors: list[str] = []

    def churn(machine: str) -> None:
        paths = [str(scratch / "pymachine" / machine)]
        for _ in range(1000):
            try:
                cgroups.create(paths)
                cgroups.remove(paths)
            except OSError as e:
                errors.append(str(e))

    try:
        threads = [threading.Thread(target=churn, args=(f"m{i}",)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        cgroups.remove([str(scratch / "pymachine" / f"m{i}") for i in range(3)])
        scratch.rmdir()
    assert errors == []


def test_a_machine_being_booted_by_its_create_is_starting(tmp_path):
    """Its processes are in its cgroups a moment before its supervisor is recorded: while its create runs, that is
    a boot under way, not the Error of a machine whose nspawn died."""
    store = Store(tmp_path / "home")
    with store.reserve("booting", "local", {}) as machine:
        machine.record(cgroups=cgroups.paths(machine.id))
        cgroups.create(machine.resources["cgroups"])
        booting = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: cgroups.join(machine.resources["cgroups"]))
        try:
            assert queries.describe(store, "booting")["state"] == "Starting"
        finally:
            booting.kill()
            booting.wait()
            cgroups.remove(machine.resources["cgroups"])
