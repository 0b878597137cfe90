"""The libvirt tests' own scratch pools: a test run that is killed leaves its pool and its directory of volumes
(an image copy is ~700 MB) to the next run, which removes them; a run still going keeps its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import URI
from tests.integration.libvirt_host import scratch_pool, virsh

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
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
