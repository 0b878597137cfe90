"""A small Debian 12 cloud image (BIOS boot, cloud-init, Debian's cloud kernel, docker.io) built with debootstrap.

Built once and cached under CACHE/libvirt-image/<recipe key>/ because it takes a few minutes. It stands in
for Debian's official cloud image, which cannot be downloaded here; it is deliberately close to it (cloud
kernel, cloud-init with NoCloud, growpart, no SSH host keys). The engine packages are preinstalled so that
provisioning under TCG only configures them.

Run as a script (`python -m tests.integration.cloudimage`) to build it and print its path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("PYMACHINE_TEST_CACHE", "/var/tmp/pymachine-test-cache")) / "libvirt-image"
MIRROR = "http://deb.debian.org/debian"
RELEASE = "bookworm"
# udev is pulled in by initramfs-tools; net.ifnames=0 keeps the NIC name eth0 whatever the bus.
PACKAGES = (
    "linux-image-cloud-amd64", "cloud-init", "cloud-guest-utils", "e2fsprogs", "ifupdown", "isc-dhcp-client",
    "openssh-server", "docker.io", "iptables", "kmod", "procps",
    # Debian's kernel enables AppArmor (and recommends the package, as Debian's cloud images have it): without
    # apparmor_parser dockerd cannot load its default profile and refuses to run containers.
    "apparmor",
    # logind (which needs D-Bus) turns the ACPI power button into a clean shutdown.
    "dbus",
)
CLOUD_CFG = """\
# Only the seed disk: no network metadata service is probed.
datasource_list: [NoCloud, None]
# The image has no `locales` package (cloud-init would report an error for that alone).
locale: false
"""
EXTLINUX_CONF = """\
DEFAULT linux
PROMPT 0
TIMEOUT 1
LABEL linux
  LINUX /boot/{kernel}
  INITRD /boot/{initrd}
  APPEND root=LABEL=pmroot ro console=ttyS0 net.ifnames=0 quiet
"""
RECIPE = {"version": 1, "release": RELEASE, "mirror": MIRROR, "packages": PACKAGES, "cloud_cfg": CLOUD_CFG,
          "extlinux": EXTLINUX_CONF}


def recipe_key() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def image_path() -> Path:
    return CACHE / recipe_key() / "debian-12-test.qcow2"


def sha256(image: Path) -> str:
    """The image's sha256, computed once and kept beside it (the tests and the bench pass it to pymachine)."""
    known = image.with_suffix(".sha256")
    if not known.is_file():
        digest = hashlib.sha256()
        with image.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        partial = known.with_name(f".{known.name}.{os.getpid()}")  # another worker may be reading it
        partial.write_text(digest.hexdigest() + "\n")
        os.replace(partial, known)
    return known.read_text().strip()


def build() -> Path:
    """Return the cached test image, building it first if needed (needs root, debootstrap, extlinux)."""
    target = image_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Test workers that start at once build it once: two builds would differ in their bytes, and so in the
    # sha256 the other worker already handed to pymachine.
    with (target.parent / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.is_file():
            _build(target)
    return target


def _build(target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build.") as tmp:
        work = Path(tmp)
        root = work / "rootfs"
        _run("debootstrap", "--variant=minbase", "--include=systemd-sysv,ca-certificates", RELEASE, str(root), MIRROR)
        _install(root)
        _configure(root)
        raw = _disk(root, work)
        qcow = work / "image.qcow2"
        _run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
        os.replace(qcow, target)


def _install(root: Path) -> None:
    # debootstrap's resolver cannot pull cloud-init (a virtual dependency), apt in the chroot can.
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")  # no services start inside the chroot
    policy.chmod(0o755)
    with _mounted(root):
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
        _run("chroot", str(root), "apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES, env=env)
        _run("chroot", str(root), "apt-get", "clean", env=env)
    policy.unlink()


@contextlib.contextmanager
def _mounted(root: Path) -> Iterator[None]:
    mounts = []
    try:
        for fs, point in (("proc", "proc"), ("sysfs", "sys"), ("devtmpfs", "dev")):
            _run("mount", "-t", fs, fs, str(root / point))
            mounts.append(root / point)
        yield
    finally:
        for point in reversed(mounts):
            subprocess.run(["umount", "-l", str(point)], check=False)


def _configure(root: Path) -> None:
    (root / "etc/cloud/cloud.cfg.d/90-pymachine-test.cfg").write_text(CLOUD_CFG)
    (root / "etc/fstab").write_text("LABEL=pmroot / ext4 errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("localhost\n")
    (root / "etc/network/interfaces").write_text(
        "auto lo\niface lo inet loopback\nsource /etc/network/interfaces.d/*\n")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # cloud-init writes the host key pymachine pinned
    (root / "etc/machine-id").write_text("")
    # An offline image: `apt-get update` during provisioning must not reach out (and has nothing to do).
    (root / "etc/apt/sources.list").write_text("")
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)


def _disk(root: Path, work: Path) -> Path:
    """An MBR disk with one bootable ext4 partition at 1 MiB; works without udev (no loop partitions)."""
    du = subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True, check=True)
    used_mib = int(du.stdout.split()[0])
    part_mib = used_mib + 400
    part = work / "part.raw"
    _run("truncate", "-s", f"{part_mib}M", str(part))
    _run("mkfs.ext4", "-q", "-L", "pmroot", "-d", str(root), str(part))
    mnt = work / "mnt"
    mnt.mkdir()
    _run("mount", "-o", "loop", str(part), str(mnt))
    try:
        boot = mnt / "boot"
        kernel = sorted(p.name for p in boot.glob("vmlinuz-*"))[-1]
        initrd = sorted(p.name for p in boot.glob("initrd.img-*"))[-1]
        (boot / "extlinux").mkdir()
        (boot / "extlinux/extlinux.conf").write_text(EXTLINUX_CONF.format(kernel=kernel, initrd=initrd))
        _run("extlinux", "--install", str(boot / "extlinux"))
    finally:
        _run("umount", str(mnt))
    disk = work / "disk.raw"
    _run("truncate", "-s", f"{part_mib + 2}M", str(disk))
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: dos\nstart=2048, type=83, bootable\n", text=True,
                   check=True, capture_output=True)
    _run("dd", f"if={part}", f"of={disk}", "bs=1M", "seek=1", "conv=notrunc,sparse", "status=none")
    _run("dd", "if=/usr/lib/EXTLINUX/mbr.bin", f"of={disk}", "bs=440", "count=1", "conv=notrunc", "status=none")
    return disk


def _run(*cmd: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} … failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")


if __name__ == "__main__":
    print(build())
