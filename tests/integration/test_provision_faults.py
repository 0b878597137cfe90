"""Provisioning that survives faults, on one real local machine: a dropped SSH connection, a killed client,
Ctrl-C, a dpkg lock held by someone else, an interrupted dpkg, SFTP errors, and Docker's repository out of
reach. Faults are made for real: the machine's sshd session process is killed, the client gets SIGKILL."""

from __future__ import annotations

import _thread
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from machine import sshmux
from machine.errors import MachineError
from machine.roles.remote import detached
from machine.ssh import Connection, ConnectionLost, Endpoint, Result
from machine.ssh import _close_parked as close_parked
from tests.conftest import CLI
from tests.integration.conftest import busybox_image, docker, machine_cli, ssh_masters

pytestmark = pytest.mark.integration

NAME = "faults"


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Iterator[CLI]:
    tmp = tmp_path_factory.mktemp("faults")
    yield from machine_cli(tmp / "home", DOCKER_CONFIG=str(tmp / "docker-config"), DOCKER_BUILDKIT="0")


@pytest.fixture(scope="module")
def machine(cli) -> str:
    """Booted, not provisioned: the first provisioning (with its apt-get) is one of the tests."""
    cli("create", "--no-provision", "--engine-install", "distro", NAME, timeout=300)
    return NAME


# -- the machine's processes, seen from the host ------------------------------------------------------------
def machine_pids(cli: CLI, name: str) -> list[int]:
    """Host PIDs of every process in the machine (they live in its own cgroups)."""
    tag = f"pymachine/{json.loads((cli.home / 'machines' / name / 'config.json').read_text())['id']}"
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if tag in (proc / "cgroup").read_text():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pid_inside(host_pid: int) -> int:
    """The PID the machine itself gives a process (the last of its NSpid line)."""
    line = next(x for x in Path(f"/proc/{host_pid}/status").read_text().splitlines() if x.startswith("NSpid:"))
    return int(line.split()[-1])


def parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def wait_for(what: str, probe: Callable[[], object], timeout: float = 300) -> object:
    """probe() until it returns something true; fail naming `what` if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"never saw {what}")


def running(cli: CLI, name: str, words: str) -> list[int]:
    return [pid for pid in machine_pids(cli, name) if cmdline(pid).startswith(words)]


def sshd_session_of(pid: int) -> int:
    """The `sshd: root@notty` process serving the connection that started `pid`."""
    while not cmdline(pid).startswith("sshd: ") or "@notty" not in cmdline(pid):
        pid = parent(pid)
        assert pid > 1, "the process was not started over ssh"
    return pid


def connect(cli: CLI, name: str) -> Connection:
    directory = cli.home / "machines" / name
    ip = cli("ip", name).stdout.strip()
    return Connection.wait_ready(Endpoint(ip), directory / "id_ed25519", directory / "known_hosts", timeout=30)


def engine_runs_a_container(cli: CLI, name: str, tmp_path: Path) -> None:
    docker(cli, name, "build", "-q", "-t", "pm-busybox", str(busybox_image(tmp_path)))
    assert docker(cli, name, "run", "--rm", "pm-busybox", "echo", "over tls").strip() == "over tls"


def without_engine_package(cli: CLI, name: str) -> None:
    """Give the engine role's apt task work again (the packages stay in apt's cache: no second download)."""
    cli("ssh", name, "--", "DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 remove -y -q docker.io"
                           " >/dev/null")


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymachine: error: "), proc.stderr
    return lines[0]


# -- the connection itself ----------------------------------------------------------------------------------
def test_a_killed_session_is_a_lost_connection_that_reconnects(cli, machine):
    with connect(cli, machine) as conn:
        pid = int(conn.run("echo $PPID").stdout)  # the login shell's parent: this connection's sshd
        host_pid = next(p for p in running(cli, machine, "sshd: root@notty") if pid_inside(p) == pid)
        os.kill(host_pid, signal.SIGKILL)
        with pytest.raises(ConnectionLost, match=f"lost the ssh connection to {conn.endpoint.host}:22"):
            conn.run("sleep 1; echo too late")
        conn.reconnect(timeout=30)
        assert conn.run("echo back").stdout == "back\n"


def interrupt_when(probe: Callable[[], object]) -> threading.Thread:
    """Ctrl-C for the main thread (as the terminal would send it) once probe() holds."""
    def watch() -> None:
        wait_for("the command to start", probe)
        _thread.interrupt_main()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_stops_the_remote_command_but_lets_detached_work_finish(cli, machine):
    with connect(cli, machine) as conn:
        interrupt_when(lambda: running(cli, machine, "sleep 3001"))
        with pytest.raises(KeyboardInterrupt):
            conn.run("sleep 3001; echo not reached")
        wait_for("the interrupted command to end", lambda: not running(cli, machine, "sleep 3001"), timeout=30)

        conn.run("rm -f /tmp/pm-detached")
        interrupt_when(lambda: running(cli, machine, "sleep 3002"))
        with pytest.raises(KeyboardInterrupt):
            conn.run(detached("sleep 3002 & echo $! > /tmp/pm-sleep; wait; echo finished > /tmp/pm-detached"))
    # What runs detached (a package manager) is left to finish: here, once its sleep ends.
    with connect(cli, machine) as conn:
        conn.run("kill $(cat /tmp/pm-sleep)")
        wait_for("the detached script to finish",
                 lambda: conn.run("cat /tmp/pm-detached 2>/dev/null").stdout == "finished\n", timeout=30)


def test_commands_share_one_login_kept_between_them(cli, machine):
    """OpenSSH's multiplexing (machine.sshmux): the user's `ssh` and pymachine's own shells, one connection."""
    sshd = cli("ssh", machine, "--", "echo $PPID").stdout  # the login shell's parent: the connection's sshd
    assert cli("ssh", machine, "--", "echo $PPID").stdout == sshd
    with connect(cli, machine) as conn:
        assert conn.run("echo $PPID", shell="sh").stdout == sshd
    machine_dir = cli.home / "machines" / machine
    assert len(ssh_masters(machine_dir)) == 1
    sshmux.forget(machine_dir / "known_hosts")  # what rm, stop, kill and restart do first
    wait_for("the master to end, the machine still running", lambda: ssh_masters(machine_dir) == [], timeout=5)
    alone = CLI({**cli.env, sshmux.PERSIST_ENV: "0"})
    assert alone("ssh", machine, "--", "echo $PPID").stdout != sshd  # turned off: a login of its own
    proc = CLI({**cli.env, sshmux.PERSIST_ENV: "soon"})("ssh", machine, "--", "true", check=False)
    assert one_line_error(proc).endswith(f"{sshmux.PERSIST_ENV}='soon': expected a number of seconds "
                                         "(0 turns kept connections off)")


def test_a_shell_the_host_refuses_the_kept_connection_logs_in_itself(cli, machine):
    """sshd's MaxSessions counts every session of one connection, the user's `pymachine ssh` ones too. A shell the
    host refuses the kept connection (here: a second one, at MaxSessions 1) runs over a login of the command's
    own, and the kept connection goes on serving the shell it has."""
    machine_dir = cli.home / "machines" / machine
    limit = "/etc/ssh/sshd_config.d/pm-test-max-sessions.conf"

    def new_connections_get(config: str) -> None:
        cli("ssh", machine, "--", f"{config}; systemctl reload ssh")
        sshmux.forget(machine_dir / "known_hosts")  # sshd reads its limits when a connection starts
        wait_for("the kept connection to end", lambda: ssh_masters(machine_dir) == [], timeout=5)
        close_parked()  # and an earlier test's login, parked a moment ago, is not the next one

    new_connections_get(f"echo 'MaxSessions 1' > {limit}")
    try:
        with connect(cli, machine) as conn:
            first = conn.run("echo $PPID", shell="sh").stdout
            second = conn.run("echo $PPID", shell="env sh")  # another launcher: another session
            assert second.rc == 0 and second.stdout != first  # another connection's sshd
            assert conn.run("echo $PPID", shell="sh").stdout == first
            # Ctrl-C: the kept connection has no session for the signal either (ssh then logs in for it).
            interrupt_when(lambda: running(cli, machine, "sleep 3006"))
            with pytest.raises(KeyboardInterrupt):
                conn.run("sleep 3006", shell="sh")
            wait_for("the interrupted command to end", lambda: not running(cli, machine, "sleep 3006"), timeout=30)
        assert len(ssh_masters(machine_dir)) == 1
    finally:
        new_connections_get(f"rm -f {limit}")


@pytest.mark.parametrize("persist", ["60", "0"], ids=["over-the-kept-connection", "on-a-channel-of-its-own"])
def test_a_kept_shell_runs_each_command_as_a_channel_of_its_own_would(cli, machine, persist, monkeypatch):
    monkeypatch.setenv(sshmux.PERSIST_ENV, persist)
    binary = bytes(range(256)) * 4  # NUL bytes, no final newline: not a here-document
    with connect(cli, machine) as conn:
        assert conn.run("echo out; echo err >&2; exit 3", shell="sh") == Result(3, "out\n", "err\n")
        assert conn.run("cat", stdin=b"a text\n", shell="sh").stdout == "a text\n"
        assert conn.run("sha256sum", stdin=binary, shell="sh").stdout.split()[0] == hashlib.sha256(binary).hexdigest()
        assert conn.run("printf 'no newline'; cd /; x=1", shell="sh").stdout == "no newline"
        assert conn.run("echo $PWD $x; exec 3</dev/null", shell="sh").stdout == "/root\n"  # nothing carried over
        # A launcher that fails (sudo refusing, say) fails the command with its own status and message.
        assert conn.run("echo never", shell="sh -c 'echo refused >&2; exit 7'") == Result(7, "", "refused\n")
        with pytest.raises(MachineError, match="timed out after 1s"):
            conn.run("sleep 3003", shell="sh", timeout=1)
        assert conn.run("echo next", shell="sh").stdout == "next\n"  # in a new shell
        interrupt_when(lambda: running(cli, machine, "sleep 3004"))
        with pytest.raises(KeyboardInterrupt):
            conn.run("sleep 3004; echo not reached", shell="sh")
        wait_for("the interrupted command to end", lambda: not running(cli, machine, "sleep 3004"), timeout=30)
        assert conn.run("echo after", shell="sh").stdout == "after\n"


def test_scp_errors_are_one_line_naming_the_path(cli, machine, tmp_path):
    line = one_line_error(cli("scp", f"{machine}:/no/such/file", str(tmp_path), check=False))
    assert line.endswith(":/no/such/file: no such file or directory")
    source = tmp_path / "a"
    source.write_text("a")
    line = one_line_error(cli("scp", str(source), f"{machine}:/no/such/dir/a", check=False))
    assert line.endswith(":/no/such/dir/a: no such file or directory")
    line = one_line_error(cli("scp", f"{machine}:/etc/hostname", str(tmp_path / "missing" / "x"), check=False))
    assert line.endswith(f"{tmp_path / 'missing' / 'x'}: no such file or directory")


# -- provisioning -------------------------------------------------------------------------------------------
def test_a_client_killed_during_apt_get_leaves_nothing_for_the_next_run(cli, machine, tmp_path):
    first = cli.popen("provision", machine)
    try:
        wait_for("apt-get installing the engine", lambda: running(cli, machine, "apt-get -y -q"))
        first.kill()
    finally:
        first.wait()
    # At once, with the killed run's apt-get still at work in the machine: nobody removes a lock by hand.
    again = cli("provision", machine, timeout=900)
    assert "failed=0" in again.stdout
    engine_runs_a_container(cli, machine, tmp_path)


def test_provisioning_survives_its_ssh_connection_being_killed(cli, machine, tmp_path):
    without_engine_package(cli, machine)
    run = cli.popen("provision", machine)
    try:
        apt = wait_for("apt-get installing the engine", lambda: running(cli, machine, "apt-get -y -q"))
        os.kill(sshd_session_of(apt[0]), signal.SIGKILL)
        out, err = run.communicate(timeout=900)
    finally:
        run.kill()
    assert run.returncode == 0, err
    assert "the ssh connection was lost; reconnecting" in err
    assert "failed=0" in out
    engine_runs_a_container(cli, machine, tmp_path)


def test_ctrl_c_during_apt_get_exits_quietly_and_lets_apt_get_finish(cli, machine, tmp_path):
    without_engine_package(cli, machine)
    run = cli.popen("provision", machine)
    try:
        apt = wait_for("apt-get installing the engine", lambda: running(cli, machine, "apt-get -y -q"))
        run.send_signal(signal.SIGINT)
        err = run.communicate(timeout=60)[1]
    finally:
        run.kill()
    assert run.returncode == 130
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith("pymachine: ")
    # Installing the engine from apt's cache takes seconds; pymachine is gone long before, apt-get is not.
    assert cmdline(apt[0]).startswith("apt-get -y -q")
    assert "failed=0" in cli("provision", machine, timeout=900).stdout
    engine_runs_a_container(cli, machine, tmp_path)


def test_provisioning_waits_for_a_dpkg_lock_held_by_someone_else(cli, machine, tmp_path):
    without_engine_package(cli, machine)
    hold = ("import fcntl, os, time\nf = open('/var/lib/dpkg/lock-frontend', 'w'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
            "while not os.path.exists('/tmp/pm-release'): time.sleep(0.1)\n")
    cli("ssh", machine, "--", f"rm -f /tmp/pm-release; setsid python3 -c \"{hold}\" >/dev/null 2>&1 </dev/null &")
    holder = wait_for("the lock holder", lambda: running(cli, machine, "python3 -c"))
    run = cli.popen("provision", machine)
    try:
        assert run.stderr is not None
        line = run.stderr.readline()
        assert f"waiting up to 600s for the dpkg lock held by process {pid_inside(holder[0])} (python3)" in line
        cli("ssh", machine, "--", "touch /tmp/pm-release")
        out, err = run.communicate(timeout=900)
    finally:
        run.kill()
        cli("ssh", machine, "--", "touch /tmp/pm-release")
    assert run.returncode == 0, err
    assert "failed=0" in out
    assert cli("ssh", machine, "--", "dpkg-query -W -f '${db:Status-Abbrev}' docker.io").stdout.strip() == "ii"


def test_an_interrupted_dpkg_is_repaired(cli, machine):
    # A package whose configuration blocks until told, and dpkg killed while configuring it.
    build = (
        "set -e; d=$(mktemp -d); mkdir $d/DEBIAN\n"
        "printf 'Package: pm-fault\\nVersion: 1\\nArchitecture: all\\nMaintainer: t <t@example.com>\\n"
        "Description: t\\n' > $d/DEBIAN/control\n"
        "printf '#!/bin/sh\\nwhile [ -e /tmp/pm-block ]; do sleep 0.1; done\\n' > $d/DEBIAN/postinst\n"
        "chmod 755 $d/DEBIAN/postinst; dpkg-deb -b $d /tmp/pm-fault.deb >/dev/null; touch /tmp/pm-block\n"
        "setsid dpkg -i /tmp/pm-fault.deb >/dev/null 2>&1 </dev/null &"
    )
    cli("ssh", machine, "--", build)
    wait_for("the package's postinst", lambda: running(cli, machine, "/bin/sh /var/lib/dpkg/info/pm-fault.postinst"))
    for pid in running(cli, machine, "dpkg -i"):
        os.kill(pid, signal.SIGKILL)
    cli("ssh", machine, "--", "rm /tmp/pm-block")
    broken = cli("ssh", machine, "--", "apt-get install -y -q hello", check=False)
    assert "dpkg was interrupted" in broken.stderr

    out = cli("provision", machine, timeout=900).stdout
    assert "failed=0" in out
    state = cli("ssh", machine, "--", "dpkg --audit; dpkg-query -W -f '${db:Status-Abbrev}' pm-fault").stdout
    assert state.strip() == "ii"


@pytest.mark.parametrize("where", [[], ["--no-local-engine-layer"]], ids=["engine cache", "role"])
def test_an_unreachable_docker_repository_says_to_use_the_distro_packages(cli, where):
    # Docker's repository cannot be reached from here (no route to the internet), the real URL: by the engine
    # cache's build on this host, or by the real role on the machine.
    proc = cli("create", "--engine-install", "official", *where, "official", check=False, timeout=600)
    line = one_line_error(proc)
    assert "Docker's repository https://download.docker.com/linux failed" in line
    assert "use --engine-install distro" in line
    assert "official" not in cli("ls", "-q").stdout.split()
