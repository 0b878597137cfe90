"""--local-image: a rootfs tarball fetched over HTTP once, verified, cached under a lock."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from machine.drivers.local import rootfs
from tests.integration.conftest import CACHE, serve_directory

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tarball(tmp_path_factory) -> Path:
    """The test base rootfs as a tarball, as a user would publish one."""
    base = rootfs.base_rootfs(Path(CACHE) / "local", "bookworm", "http://deb.debian.org/debian")
    path = tmp_path_factory.mktemp("image") / "rootfs.tar"
    subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(base), "-cf", str(path), "."], check=True)
    return path


@pytest.fixture
def server(tarball):
    """A loopback HTTP server for the tarball that counts the downloads; stopped after the test."""
    with serve_directory(tarball.parent) as (base, gets):
        yield f"{base}/{tarball.name}", gets


def test_parallel_creates_download_and_unpack_once(local, server, tarball, tmp_path):
    url, gets = server
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    local.env["PYMACHINE_CACHE"] = str(tmp_path / "cache")
    args = ["--no-provision", "--local-image", url, "--local-image-sha256", digest]
    procs = [local.popen("create", *args, name) for name in ("img1", "img2")]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert gets == [f"/{tarball.name}"]
    # In a log, the one download and the one unpacking say so: size, time and rate; how long unpacking took.
    log = "".join(proc.stdout.read() for proc in procs)
    size, took = f"{tarball.stat().st_size / (1 << 20):.1f} MiB", r"(?:[\d.]+ s|\d+m\d\ds)"
    assert re.search(rf"^img\d: downloading rootfs\.tar \({size}\)$", log, re.M), log
    assert len(re.findall(rf"^img\d: downloaded rootfs\.tar: {size} in {took} \([\d.]+ MiB/s\)$", log, re.M)) == 1
    assert len(re.findall(rf"^img\d: unpacking {re.escape(url)}: done in {took}$", log, re.M)) == 1
    assert [p.name for p in (tmp_path / "cache/local/images").iterdir() if not p.name.startswith(".")] == [digest]
    assert len([p for p in (tmp_path / "cache/local/rootfs").iterdir() if p.is_dir()]) == 1
    assert local("ssh", "img2", "--", "hostname").stdout.strip() == "img2"


def test_checksum_mismatch_leaves_nothing(local, server, tmp_path):
    url, _ = server
    local.env["PYMACHINE_CACHE"] = str(tmp_path / "cache")
    proc = local("create", "--no-provision", "--local-image", url, "--local-image-sha256", "0" * 64, "bad", check=False)
    assert proc.returncode == 1 and "checksum mismatch" in proc.stderr
    assert local("ls", "-q").stdout.strip() == ""
    assert [p.name for p in (tmp_path / "cache/local/images").iterdir() if not p.name.startswith(".")] == []


def test_an_interrupted_base_build_leaves_no_mount_and_no_process(tmp_path, monkeypatch):
    # debootstrap mounts proc and sysfs in the rootfs for its second stage and unmounts them in its exit trap,
    # which a kill skips. A stand-in does the same and starts a child (as debootstrap runs dpkg), then Ctrl-C
    # (SIGINT to pymachine) arrives.
    fake = tmp_path / "bin/debootstrap"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nmkdir -p "$4/proc" && mount -t tmpfs pm-test-proc "$4/proc" || exit 1\n'
                    'sleep 317 &\necho "I: Configuring base-files"\nkill -INT "$PM_TEST_PID"\nwait\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("PM_TEST_PID", str(os.getpid()))
    with pytest.raises(KeyboardInterrupt):
        rootfs.base_rootfs(tmp_path / "cache", "bookworm", "http://127.0.0.1:9/debian")
    assert "pm-test-proc" not in Path("/proc/self/mountinfo").read_text()
    assert not list((tmp_path / "cache").rglob("*.build"))  # the staging directory could be removed
    assert subprocess.run(["pgrep", "-f", "^sleep 317$"], capture_output=True).returncode == 1
