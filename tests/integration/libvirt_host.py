"""Helpers for tests that drive a real libvirtd: the test image, virsh, and a storage pool of the tests' own."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI
from tests.integration import cloudimage

# Above pymachine's own bound on a boot (libvirt's BOOT_TIMEOUT, then the SSH and engine waits): a boot too slow
# fails with pymachine's error, which names the guest console's last line, not with the test's kill.
BOOT_TIMEOUT = 960


def require_libvirt() -> None:
    if shutil.which("libvirtd") is None or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs libvirt-daemon-system and qemu-system-x86")
    pytest.importorskip("libvirt")


def boot_image() -> tuple[Path, str]:
    """The Debian 12 cloud image the tests boot (built once, then cached), and its sha256."""
    if shutil.which("debootstrap") is None or shutil.which("extlinux") is None:
        pytest.skip("needs debootstrap and extlinux to build the test image")
    image = cloudimage.build()
    return image, cloudimage.sha256(image)


def virsh(uri: str, *args: str, check: bool = True, like: CLI | None = None) -> subprocess.CompletedProcess[str]:
    """virsh on `uri`; `like` a test CLI: as its user, in its namespace, with its environment."""
    prefix, env = (like.prefix, like.env) if like else ([], None)
    proc = subprocess.run([*prefix, "virsh", "-q", "-c", uri, *args], env=env, capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {proc.stderr}")
    return proc


def domains(uri: str, like: CLI | None = None) -> list[str]:
    return virsh(uri, "list", "--all", "--name", like=like).stdout.split()


def volumes(uri: str, pool: str, like: CLI | None = None) -> list[str]:
    return [line.split()[0] for line in virsh(uri, "vol-list", pool, like=like).stdout.splitlines()
            if line.split()]


# A run's pools and their directories are named by its PID: the next run removes those of a run that was killed.
_POOL = re.compile(r"pmtest-(\d+)-[0-9a-f]+")
_POOL_DIR = re.compile(r"pmtest-pool-(\d+)-")
_NAMESPACE = re.compile(r"pmtest-lv-(\d+)-[0-9a-f]+")
SCRATCH = Path("/var/tmp")


@contextlib.contextmanager
def transient_pool(uri: str, path: Path) -> Iterator[str]:
    """A directory pool at `path`, removed with its volumes at the end."""
    name = f"pmtest-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.chmod(0o755)  # QEMU runs as libvirt-qemu: it reads the pool and must traverse to it
    for parent in path.parents:
        if parent != Path("/"):
            parent.chmod(parent.stat().st_mode | 0o111)
    virsh(uri, "pool-create-as", name, "dir", "--target", str(path))
    try:
        yield name
    finally:
        _remove_pool(uri, name)


def _remove_pool(uri: str, name: str) -> None:
    for volume in volumes(uri, name):
        virsh(uri, "vol-delete", "--pool", name, volume, check=False)
    virsh(uri, "pool-destroy", name, check=False)


def _run_gone(pid: str) -> bool:
    return not Path(f"/proc/{pid}").exists()


def sweep_killed_runs(uri: str) -> None:
    """Remove the pools and pool directories of test runs that were killed. A transient pool outlives its run:
    libvirtd keeps its state under /run/libvirt/storage and restores it when it starts again."""
    for name in virsh(uri, "pool-list", "--name").stdout.split():
        if (found := _POOL.fullmatch(name)) and _run_gone(found[1]):
            _remove_pool(uri, name)
    for path in SCRATCH.glob("pmtest-pool-*"):
        if (found := _POOL_DIR.match(path.name)) and _run_gone(found[1]):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def scratch_pool(uri: str) -> Iterator[tuple[str, Path]]:
    """(name, directory) of a transient pool in a directory of its own under /var/tmp, removed at the end.

    Not under pytest's basetemp: every pytest that starts makes /tmp/pytest-of-<user> 0700 again, and QEMU
    (running as libvirt-qemu) could then no longer reach the disks of a run that is still going.
    """
    sweep_killed_runs(uri)
    path = Path(tempfile.mkdtemp(prefix=f"pmtest-pool-{os.getpid()}-", dir=SCRATCH))
    try:
        with transient_pool(uri, path) as name:
            yield name, path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def run_namespace() -> Iterator[str]:
    """A network namespace of the run's own (loopback up, no route out), removed at the end with everything that
    runs in it; first, those of runs that were killed (their libvirtd, dnsmasq and QEMUs would run on for good:
    they are in sessions of their own)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    for line in listed.splitlines():
        name = line.split()[0]
        if (found := _NAMESPACE.fullmatch(name)) and _run_gone(found[1]):
            _remove_namespace(name)
    namespace = f"pmtest-lv-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", namespace], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True, capture_output=True,
                       timeout=60)
        yield namespace
    finally:
        _remove_namespace(namespace)


def _remove_namespace(namespace: str) -> None:
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait
        while pids := subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                                     text=True).stdout.split():
            if time.monotonic() > deadline:
                break
            subprocess.run(["kill", f"-{sig.value}", *pids], capture_output=True)
            time.sleep(0.2)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
