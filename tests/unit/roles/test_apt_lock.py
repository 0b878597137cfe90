"""The shell the apt module runs around apt-get: who holds a dpkg lock, waiting for it, detached runs; when the
cache is refreshed.

Real shells and real POSIX locks on this host, on lock files of the test's own (never the host's dpkg)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from machine.roles.modules import Context, packages
from machine.roles.remote import detached
from machine.roles.templating import Templar, Vars


def sh(script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def locks(tmp_path: Path) -> tuple[str, str]:
    """Two lock files standing in for dpkg's, which the snippets then watch instead."""
    paths = (tmp_path / "lock-frontend", tmp_path / "lock")
    for path in paths:
        path.touch()
    return str(paths[0]), str(paths[1])


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def hold(path: str, release: Path) -> subprocess.Popen:
    """A process holding a POSIX lock on `path` (as apt and dpkg take theirs) until `release` exists."""
    code = ("import fcntl, os, sys, time\n"
            "f = open(sys.argv[1], 'w'); fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True)\n"
            "while not os.path.exists(sys.argv[2]): time.sleep(0.05)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, path, str(release)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_holder_names_the_process_holding_a_lock(locks, tmp_path):
    function = packages.lock_holder_function(locks)
    assert sh(f"{function}; holder").returncode == 1  # nobody holds them
    holder = hold(locks[1], tmp_path / "release")
    try:
        out = sh(f"{function}; holder")
        assert out.returncode == 0
        assert out.stdout.split() == [str(holder.pid), comm(holder.pid)]
    finally:
        (tmp_path / "release").touch()
        holder.wait()


def test_wait_for_locks_waits_until_the_holder_lets_go(locks, tmp_path):
    release = tmp_path / "release"
    holder = hold(locks[0], release)
    script = packages.wait_for_locks(60, locks) + "\necho got it"
    waiter = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        # Still waiting while the lock is held (it would have printed and exited otherwise).
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=1.5)
        release.touch()
        out, _ = waiter.communicate(timeout=30)
        assert waiter.returncode == 0 and out.strip() == "got it"
    finally:
        release.touch()
        holder.wait()
        waiter.kill()


def test_wait_for_locks_gives_up_naming_the_holder(locks, tmp_path):
    holder = hold(locks[0], tmp_path / "release")
    try:
        out = sh(packages.wait_for_locks(1, locks) + "\necho never")
        assert out.returncode == 1 and "never" not in out.stdout
        assert out.stderr.strip() == f"the dpkg lock is still held by process {holder.pid} " \
                                     f"({comm(holder.pid)}) after 1s"
    finally:
        (tmp_path / "release").touch()
        holder.wait()


def test_detached_script_gives_back_its_output_and_status(tmp_path):
    out = sh(detached("echo out; echo err >&2; exit 3"), timeout=30)
    assert out.returncode == 3
    assert out.stdout.splitlines() == ["out", "err"]


def test_detached_script_runs_in_a_session_of_its_own(tmp_path):
    out = sh(detached("cut -d' ' -f6 /proc/self/stat"), timeout=30)
    # A process group kill of the caller (what Ctrl-C does to a remote command) does not reach it.
    assert out.returncode == 0 and int(out.stdout) != os.getsid(0)


def test_detached_script_finishes_when_its_caller_is_killed(tmp_path):
    done = tmp_path / "done"
    caller = subprocess.Popen(["setsid", "sh", "-c", detached(f"sleep 1; echo finished > {done}")])
    time.sleep(0.3)
    os.killpg(caller.pid, 15)  # the caller's whole process group, as machine.ssh does after Ctrl-C
    caller.wait(timeout=10)
    deadline = time.monotonic() + 20
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert done.read_text() == "finished\n"


def test_detached_script_leaves_no_temporary_file(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["sh", "-c", detached("echo hi")], env=env, capture_output=True, text=True, timeout=30)
    assert proc.stdout == "hi\n"
    assert list(tmp_path.iterdir()) == []


class _Probed:
    """A Remote answering the apt module's probe: now, no dpkg journal, the cache stamp's age; nothing installed."""

    def __init__(self, age: int) -> None:
        self.age = age

    def run(self, script, **kw):
        now = int(time.time())
        return SimpleNamespace(rc=0, stdout=f"{now}\n\n{now - self.age}\n0\n@@pm@@\n@@pm@@\n", stderr="")


@pytest.mark.parametrize("args, age, refresh", [
    ({"cache_valid_time": 3600}, 7200, True),  # alone, it implies update_cache (Ansible since 2.4)
    ({"cache_valid_time": 3600}, 60, False),
    ({"update_cache": True, "cache_valid_time": 3600}, 60, False),
    ({"update_cache": True}, 60, True),
    ({}, 7200, False),
])
def test_apt_cache_valid_time_alone_refreshes_an_old_cache(args, age, refresh):
    ctx = Context(remote=_Probed(age), templar=Templar(), vars=Vars(Templar(), []), facts={}, search_paths={})
    assert packages.Apt(ctx, args).plan() == ([], [], refresh)
