"""The engine cache for libvirt machines: a qcow2 layer of the engine's packages between a disk and its image.

The packages are installed without booting anything, exactly as for local machines (drivers/local/layers.py,
whose keys, archive checks, identity strip and generations this reuses): the cloud image's root filesystem is
mounted on the host from a raw copy, the layer build installs the package set over it in a throwaway container,
and what that wrote is then applied to the copy. qemu-img keeps only the clusters of the copy that differ from
the image, so the generation's `disk.qcow2` holds the packages and nothing else. The driver uploads it into
the pool once, backed by the base volume, and each machine's disk is an overlay over it:
machine → engine layer → base image.

It needs root on pymachine's host (a loop mount, the container) and a Debian-family image whose root filesystem
the host can mount from one of its partitions and has room for the packages (a cloud image's is only a little
larger than its contents until cloud-init grows it at boot); otherwise (a session libvirt as a user, an LVM
image) it is Declined, with the reason, and the roles install the packages in the machine, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from machine import ui
from machine.drivers.libvirt import storage
from machine.drivers.local import layers
from machine.enginecache import PackageSet, Repository
from machine.errors import MachineError
from machine.store import file_lock, write_atomic

DIR = "engine-roots"  # in the libvirt cache: <image key>/rootfs, where an image's root is mounted while building
DISK = "disk.qcow2"  # in a layer's generation, beside its rootfs/ (what the build wrote) and manifest
_OPAQUE = "trusted.overlay.opaque"  # an overlay's "this directory replaces the lower one whole"
_DECLINED = 3  # _build's exit code for "this image's root cannot be prepared here"
_DECLINED_FILE = "declined"  # why, in an image's directory (no apt) or a generation (no room) that cannot be had
log = logging.getLogger("pymachine.libvirt")


class Declined(Exception):
    """This host or image cannot have the layer (the reason): the roles install the packages in the machine."""


def prepare(image: Path, cache: Path, packages: PackageSet, recheck: bool = False) -> Path:
    """The qcow2 layer of `packages` over `image` (its backing file is `image`), built when missing and checked
    against the archive as local layers are; Declined when it cannot be had here (see the module's text)."""
    if os.geteuid() != 0:
        raise Declined("building it needs root")
    key = cache / DIR / image.name[:16]  # the cache names images by their sha256
    root = key / "rootfs"
    if not recheck and (known := _known(cache, root, packages)) is not None:
        return known
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(key.parent / f"{key.name}.lock", timeout=layers.BUILD_TIMEOUT, what=f"engine layer of {key.name}"):
        if not recheck and (known := _known(cache, root, packages)) is not None:  # built while this one waited
            return known
        raw = key / f"image-{os.getpid()}.raw"  # its own: a build whose parent was killed may still hold one
        try:
            with ui.step(f"preparing the {packages.name} engine layer over the image (once)"):
                storage.qemu_img("convert", "-O", "raw", str(image), str(raw))
                generation = _build(raw, root, cache, packages, recheck)
            if (generation / DISK).is_file():
                return generation / DISK
            with ui.step(f"preparing the {packages.name} engine layer: writing its qcow2 layer"):
                # An empty overlay of the changed copy, rebased onto the image in safe mode: qemu-img compares
                # the two and writes only the clusters that differ (`convert -B` would copy every used one).
                part = generation / f".{DISK}.part"
                storage.qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=1.1", "-b", str(raw), "-F", "raw",
                                 str(part))
                storage.qemu_img("rebase", "-f", "qcow2", "-b", str(image), "-F", storage.image_info(image)[0],
                                 str(part))
                os.rename(part, generation / DISK)
            return generation / DISK
        except MachineError as e:
            # The daily question to the archive failed (offline, say): the layer it had is still good for a create.
            current = None if recheck else layers.current(cache, root, packages)
            if current is None or not (current.parent / DISK).is_file():
                raise
            log.warning("the %s engine layer was not checked against the archive (%s): using the one from %s",
                        packages.name, e, layers.manifest(current.parent).get("built", "before"))
            return current.parent / DISK
        finally:
            raw.unlink(missing_ok=True)


def _known(cache: Path, root: Path, packages: PackageSet) -> Path | None:
    """The current layer's disk when no check is due; Declined at once when a build found that the image, or
    this generation over it, cannot have one."""
    fresh = layers.fresh(cache, root, packages)
    for where in (root.parent, fresh.parent if fresh is not None else None):
        if where is not None and (where / _DECLINED_FILE).is_file():
            raise Declined((where / _DECLINED_FILE).read_text().strip())
    return fresh.parent / DISK if fresh is not None and (fresh.parent / DISK).is_file() else None


def _build(raw: Path, root: Path, cache: Path, packages: PackageSet, recheck: bool) -> Path:
    """Mount the raw copy's root filesystem at `root`, check or build the layer over it and, for a generation
    without its qcow2 yet, apply what the build wrote to the copy; the generation (Declined: the image's root
    cannot be mounted, has no apt, or no room for the packages). Runs in a process with a mount namespace of its
    own: the mount is seen by nothing else (a local machine starting meanwhile would keep a copy of it, and the
    copy's filesystem unwritten) and vanishes with that process, whatever happens to it."""
    import machine  # where the package is, for a pymachine run from a checkout as much as from a wheel

    package_path = str(Path(machine.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_path, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", __name__, str(raw), str(root),
         str(cache), json.dumps({"packages": dataclasses.asdict(packages), "recheck": recheck})],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    lines = proc.stderr.strip().splitlines()
    if proc.returncode == _DECLINED:
        raise Declined(lines[-1])
    if proc.returncode != 0:
        raise MachineError(f"{lines[-1] if lines else f'building the engine layer failed (exit {proc.returncode})'}"
                           f" (--no-libvirt-engine-layer installs the packages in the machine instead)")
    return Path(proc.stdout.strip())


def _build_here(raw: Path, root: Path, cache: Path, packages: PackageSet, recheck: bool) -> Path:
    """_build's work, in its own mount namespace."""
    offset, size = _root_partition(raw)
    mount = subprocess.run(["mount", "-o", f"loop,offset={offset},sizelimit={size}", str(raw), str(root)],
                           capture_output=True, text=True)
    if mount.returncode != 0:  # LVM, a filesystem this kernel does not know
        raise Declined(f"the image's root filesystem cannot be mounted here ({mount.stderr.strip()[:200]})")
    try:
        if not (root / "usr/bin/apt-get").exists():
            _decline(root.parent, "the image has no apt-get")  # an image never changes: asked once
        generation = layers.layer(cache, root, packages, recheck).parent
        if not (generation / DISK).is_file():
            try:
                _make_room(generation / "rootfs", root)
                _apply(generation / "rootfs", root)
            except Declined as e:
                _decline(generation, str(e))  # until the archive brings another generation
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                _decline(generation, f"the image's root filesystem has no room for the packages ({e.strerror})")
    finally:
        # Writes the filesystem out before the copy is read; a failed unmount says so unless a failure is on its way.
        unmounted = subprocess.run(["umount", str(root)], capture_output=True, text=True)
    if unmounted.returncode != 0:
        raise MachineError(f"cannot unmount the image's copy: {unmounted.stderr.strip()}")
    return generation


def _decline(where: Path, reason: str) -> None:
    """Declined, remembered in `where` (the image's directory, or a generation) for the creates after this one."""
    write_atomic(where / _DECLINED_FILE, f"{reason}\n".encode(), 0o644)
    raise Declined(reason)


def _root_partition(raw: Path) -> tuple[int, int]:
    """(offset, size) in bytes of the largest partition: the root filesystem of a cloud image (Debian's and
    Ubuntu's beside small BIOS boot and EFI partitions)."""
    proc = subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True)
    try:
        table = json.loads(proc.stdout)["partitiontable"]
        largest = max(table["partitions"], key=lambda p: p["size"])
        sector = table.get("sectorsize", 512)
        return largest["start"] * sector, largest["size"] * sector
    except (ValueError, KeyError):  # no partition table: a filesystem image
        return 0, raw.stat().st_size


def _make_room(upper: Path, root: Path) -> None:
    """Declined unless `root` has room for what `upper` holds: a cloud image's filesystem is only as large as its
    contents and some slack (cloud-init grows it to the disk at boot, where the roles would install)."""
    fs = os.statvfs(root)
    entries = [os.lstat(os.path.join(d, name)) for d, dirs, files in os.walk(upper) for name in [*dirs, *files]]
    # Sizes in the image's blocks (the host's filesystem may compress or pack small files).
    needed = sum(-(-st.st_size // fs.f_frsize) * fs.f_frsize for st in entries)
    free = fs.f_bavail * fs.f_frsize
    if needed + (64 << 20) > free:  # and some room for the filesystem's own metadata
        raise Declined(f"the image's root filesystem has {free >> 20} MiB free, the packages take {needed >> 20} MiB")
    if len(entries) > fs.f_favail:
        raise Declined(f"the image's root filesystem has {fs.f_favail} inodes free, the packages need {len(entries)}")


def _apply(upper: Path, root: Path) -> None:
    """Write an overlay's upper directory onto `root`: what it holds replaces what `root` had, its whiteouts
    remove, its opaque directories replace theirs whole; owners, modes, times and xattrs (file capabilities)
    are kept, the overlay's own bookkeeping is not."""
    linked: dict[tuple[int, int], Path] = {}  # hard links stay links: (device, inode) → where it was written
    for dirpath, dirnames, filenames in os.walk(upper):
        here = root / os.path.relpath(dirpath, upper)
        for name in [*dirnames, *filenames]:
            source, target = Path(dirpath, name), here / name
            st = os.lstat(source)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # a whiteout: the build removed it
                layers.remove(target)
                continue
            if stat.S_ISDIR(st.st_mode):
                if target.is_symlink() or (target.exists() and (not target.is_dir() or _opaque(source))):
                    layers.remove(target)
                if not target.exists():
                    target.mkdir()
            else:
                layers.remove(target)
                if (st.st_dev, st.st_ino) in linked:
                    os.link(linked[st.st_dev, st.st_ino], target)
                    continue
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(source), target)
                elif stat.S_ISREG(st.st_mode):
                    shutil.copyfile(source, target)
                    if st.st_nlink > 1:
                        linked[st.st_dev, st.st_ino] = target
                else:
                    os.mknod(target, st.st_mode, st.st_rdev)
            _copy_metadata(source, target, st)
    # Directories' times last: writing into a directory changes its times (and /usr's is what marks the layer's
    # /etc and /var up to date for it).
    for dirpath, _, _ in os.walk(upper, topdown=False):
        target = root / os.path.relpath(dirpath, upper)
        if dirpath != str(upper):
            st = os.lstat(dirpath)
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _copy_metadata(source: Path, target: Path, st: os.stat_result) -> None:
    os.chown(target, st.st_uid, st.st_gid, follow_symlinks=False)  # first: a chown clears set-id bits
    shutil.copystat(source, target, follow_symlinks=False)  # mode, times, xattrs (file capabilities)
    with contextlib.suppress(OSError):
        os.removexattr(target, _OPAQUE, follow_symlinks=False)


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, _OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _main(raw: str, root: str, cache: str, spec: str) -> int:
    _die_with_parent()
    wanted = json.loads(spec)
    given = wanted["packages"]
    packages = PackageSet(given["name"], tuple(given["apt"]),
                          Repository(**given["repository"]) if given["repository"] else None)
    try:
        generation = _build_here(Path(raw), Path(root), Path(cache), packages, wanted["recheck"])
    except Declined as e:
        print(e, file=sys.stderr)
        return _DECLINED
    except MachineError as e:
        print(e, file=sys.stderr)
        return 1
    except Exception as e:  # one line for the parent to show, never a traceback
        print(f"building the engine layer failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(generation)
    return 0


def _die_with_parent() -> None:
    """Be killed when the create that started this build dies: a build left running would keep writing while
    the next create builds (the parent's lock dies with it)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent is already gone (unshare exec'd this process: its parent is the create)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(_main(*sys.argv[1:]))
