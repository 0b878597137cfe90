"""Helpers for tests that drive a real libvirtd: virsh, and a storage pool of the tests' own."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def require_libvirt() -> None:
    if shutil.which("libvirtd") is None or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs libvirt-daemon-system and qemu-system-x86")
    pytest.importorskip("libvirt")


def virsh(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {proc.stderr}")
    return proc


def domains(uri: str) -> list[str]:
    return virsh(uri, "list", "--all", "--name").stdout.split()


def volumes(uri: str, pool: str) -> list[str]:
    return [line.split()[0] for line in virsh(uri, "vol-list", pool).stdout.splitlines() if line.split()]


@contextlib.contextmanager
def transient_pool(uri: str, path: Path) -> Iterator[str]:
    """A directory pool at `path`, removed with its volumes at the end.

    Transient: a run that is killed leaves no pool defined once its libvirtd stops.
    """
    name = f"pmtest-{uuid.uuid4().hex[:8]}"
    for directory in (path, *path.parents):
        if directory != Path("/"):  # QEMU runs as libvirt-qemu
            directory.chmod(directory.stat().st_mode | 0o111)
    path.chmod(0o755)
    virsh(uri, "pool-create-as", name, "dir", "--target", str(path))
    try:
        yield name
    finally:
        for volume in volumes(uri, name):
            virsh(uri, "vol-delete", "--pool", name, volume, check=False)
        virsh(uri, "pool-destroy", name, check=False)
