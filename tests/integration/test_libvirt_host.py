"""What the libvirt tests make for themselves: a test run that is killed leaves its scratch pool and its directory
of volumes (an image copy is ~700 MB), or its network namespace with the libvirtd, dnsmasq and QEMUs running
there, to the next run, which removes them; a run still going keeps its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import URI
from tests.integration.libvirt_host import run_namespace, scratch_pool, virsh

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HOLD_NAMESPACE = """import subprocess, time
from tests.integration.libvirt_host import run_namespace
with run_namespace() as namespace:
    daemon = subprocess.Popen(["ip", "netns", "exec", namespace, "sleep", "600"], start_new_session=True)
    print(namespace, daemon.pid, flush=True)
    time.sleep(600)
"""
HOLD = """import sys, time
from tests.integration.libvirt_host import scratch_pool
with scratch_pool(sys.argv[1]) as (name, path):
    (path / "volume.img").write_bytes(b"x" * 4096)
    print(name, path, flush=True)
    time.sleep(600)
"""


def pools() -> list[str]:
    return virsh(URI, "pool-list", "--all", "--name").stdout.split()


def hold_pool() -> tuple[subprocess.Popen[str], str, Path]:
    """Another test run holding a scratch pool: its process, the pool and its directory."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, URI], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    name, path = proc.stdout.readline().split()
    return proc, name, Path(path)


def test_the_pool_of_a_killed_run_is_removed_by_the_next_one(libvirtd):
    killed, killed_pool, killed_dir = hold_pool()
    killed.kill()
    killed.wait()
    assert killed_pool in pools() and killed_dir.is_dir()
    running, running_pool, running_dir = hold_pool()
    try:
        with scratch_pool(URI) as (mine, _):  # was: left for good, restored by every libvirtd start
            assert killed_pool not in pools() and not killed_dir.exists()
            assert running_pool in pools() and (running_dir / "volume.img").exists()
            assert mine in pools()
    finally:
        running.kill()
        running.wait()
    with scratch_pool(URI):
        assert running_pool not in pools()


def namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines()]


def running(pid: str) -> bool:
    """Whether the process runs (a zombie, its parent killed, waits to be reaped by whatever reaps here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_the_namespace_of_a_killed_run_is_removed_with_what_runs_there():
    killed = subprocess.Popen([sys.executable, "-c", HOLD_NAMESPACE], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    namespace, daemon = killed.stdout.readline().split()
    killed.kill()
    killed.wait()
    assert namespace in namespaces() and running(daemon)  # as a libvirtd of its own would be
    with run_namespace() as mine:
        assert namespace not in namespaces() and not running(daemon)
        assert mine in namespaces()
    assert mine not in namespaces()
