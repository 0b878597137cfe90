"""The libvirt engine cache's build, for real and without a boot: packages from the archive installed over a disk
image's root filesystem, kept as a qcow2 layer that holds only what changed and is backed by the image.

The image is the suite's local base (it has apt and the archive's address) on an MBR disk, as a cloud image is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine.drivers.libvirt import engine_layer
from machine.drivers.local import layers, rootfs
from machine.enginecache import PackageSet, Repository
from tests.integration.conftest import CACHE

pytestmark = pytest.mark.integration

PACKAGES = PackageSet("hello", ("hello",))  # small, and in no base
IDENTITY = ("etc/hostname", "etc/hosts", "etc/resolv.conf", "etc/machine-id")


def read(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def disk_image(work: Path, slack_mib: int) -> Path:
    """A qcow2 disk image (an MBR partition at 1 MiB holding ext4) of the local base with about `slack_mib` to
    spare, named by its sha256 as the image cache names images."""
    base = rootfs.base_rootfs(Path(CACHE) / "local", "bookworm", "http://deb.debian.org/debian")
    size = int(run("du", "-sm", str(base)).split()[0]) + slack_mib
    part, disk = work / "part.raw", work / "disk.raw"
    run("truncate", "-s", f"{size}M", str(part))
    run("mkfs.ext4", "-q", "-d", str(base), str(part))
    run("truncate", "-s", f"{size + 2}M", str(disk))
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: dos\nstart=2048, type=83\n", text=True, check=True)
    run("dd", f"if={part}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
    qcow = work / "disk.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(disk), str(qcow))
    part.unlink()
    disk.unlink()
    named = work / hashlib.sha256(qcow.read_bytes()).hexdigest()
    qcow.rename(named)
    return named


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return disk_image(tmp_path_factory.mktemp("image"), 300)


def nothing_left(key: Path) -> bool:
    """No loop device on a copy of the image under `key`, and no copy."""
    devices = json.loads(run("losetup", "--list", "--json") or '{"loopdevices": []}')["loopdevices"]
    return not [d for d in devices if str(key) in (d.get("back-file") or "")] and not list(key.glob("*.raw"))


@contextlib.contextmanager
def no_program(name: str) -> Iterator[None]:
    """`name` fails for the block (a PATH with a stand-in that exits 1 first)."""
    stand_in = Path(tempfile.mkdtemp())
    (stand_in / name).write_text("#!/bin/sh\nexit 1\n")
    (stand_in / name).chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{stand_in}:{os.environ['PATH']}")
        yield
    shutil.rmtree(stand_in)


@contextlib.contextmanager
def root_of(disk: Path, tmp: Path) -> Iterator[Path]:
    """The root filesystem that `disk` (qcow2, through its whole backing chain) holds, mounted read-only."""
    raw, mnt = tmp / f"{disk.name}.raw", tmp / f"{disk.name}.mnt"
    run("qemu-img", "convert", "-O", "raw", str(disk), str(raw))
    mnt.mkdir()
    run("mount", "-o", "ro,loop,offset=1048576", str(raw), str(mnt))
    try:
        yield mnt
    finally:
        run("umount", str(mnt))
        raw.unlink()


def test_the_layer_holds_the_packages_and_only_what_changed(image, tmp_path):
    cache = tmp_path / "cache"
    layer = engine_layer.prepare(image, cache, PACKAGES)
    assert layer.name == engine_layer.DISK
    info = json.loads(run("qemu-img", "info", "--output=json", str(layer)))
    assert info["backing-filename"] == str(image) and info["virtual-size"] == json.loads(
        run("qemu-img", "info", "--output=json", str(image)))["virtual-size"]
    # The package and apt's lists, not a copy of the image's ~300 MiB.
    assert info["actual-size"] < image.stat().st_size // 3, (info["actual-size"], image.stat().st_size)
    with root_of(image, tmp_path) as root:
        assert not (root / "usr/bin/hello").exists()  # the image itself is untouched
        identity = {name: read(root / name) for name in IDENTITY}
    with root_of(layer, tmp_path) as root:
        assert (root / "usr/bin/hello").is_file()
        assert "Package: hello\n" in (root / "var/lib/dpkg/status").read_text()
        assert (root / "var/lib/apt/periodic/update-success-stamp").is_file()  # the engine role's apt sees it fresh
        # What the build's container wrote about itself is not in the layer: the image's own files show through.
        assert {name: read(root / name) for name in IDENTITY} == identity
    # Nothing of the build is left mounted (its loop device) or copied.
    assert nothing_left(cache / engine_layer.DIR / image.name[:16])

    # Asked again: the same layer, without a build; rechecked against an archive that did not move: the same.
    built = layer.stat().st_mtime_ns
    assert engine_layer.prepare(image, cache, PACKAGES) == layer
    assert engine_layer.prepare(image, cache, PACKAGES, recheck=True) == layer
    assert layer.stat().st_mtime_ns == built and len(list(layer.parents[1].glob("2*"))) == 1

    # A day later the archive cannot be asked (here: the build cannot even start): the layer it had still serves.
    (layer.parents[1] / "current.json").write_text(json.dumps({"generation": layer.parent.name, "checked": 0}))
    with no_program("unshare"):
        assert engine_layer.prepare(image, cache, PACKAGES) == layer


def test_a_repository_the_role_adds_is_in_the_layer_as_the_role_writes_it(image, tmp_path, docker_repository):
    """Docker's repository (here its stand-in) for the image's own facts: its key and list in the layer, read by
    apt in the build (the package is Debian's, small: the image has room for little more)."""
    url, asked = docker_repository
    packages = PackageSet("hello-docker-repo", ("hello",), Repository(f"{url}/linux", "stable"))
    layer = engine_layer.prepare(image, tmp_path / "cache", packages)
    with urllib.request.urlopen(f"{url}/linux/debian/gpg") as response:
        key = response.read()
    with root_of(layer, tmp_path) as root:
        assert (root / "usr/bin/hello").is_file()
        assert (root / "etc/apt/keyrings/docker.asc").read_bytes() == key
        listed = (root / "etc/apt/sources.list.d/docker.list").read_text()
        assert f"deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] {url}/linux/debian bookworm stable" in listed
    assert "/linux/debian/dists/bookworm/InRelease" in asked


def test_an_image_without_room_for_the_packages_is_declined_and_leaves_nothing(tmp_path):
    """A cloud image's filesystem is barely larger than its contents until cloud-init grows it at boot: where the
    packages do not fit, the layer is declined with the reason (the roles install them in the grown machine)."""
    tight = disk_image(tmp_path, 60)  # less than apt's lists alone
    cache = tmp_path / "cache"
    with pytest.raises(engine_layer.Declined, match=r"has \d+ MiB free, the packages take \d+ MiB"):
        engine_layer.prepare(tight, cache, PACKAGES)
    assert nothing_left(cache / engine_layer.DIR / tight.name[:16])
    assert not list(cache.glob(f"{layers.DIR}/*/*/{engine_layer.DISK}"))
    # The next create is told at once, without copying and mounting the image again.
    with pytest.raises(engine_layer.Declined, match="MiB free"), no_program("qemu-img"):
        engine_layer.prepare(tight, cache, PACKAGES)
