"""Volumes in a libvirt storage pool: the shared base image, each machine's overlay and its seed.

The base image is uploaded into the pool once (QEMU under qemu:///system runs as its own user and cannot
read pymachine's 0700 cache); each machine's disk is a qcow2 overlay backed by it, or by an engine layer
backed by it (drivers/libvirt/engine_layer.py), so a new machine costs only the blocks it writes.
"""

from __future__ import annotations

import contextlib
import functools
import html
import io
import json
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from machine.drivers.libvirt.connection import is_missing, libvirt_module, message
from machine.errors import MachineError
from machine.store import file_lock

# XML text escaping (&, <, >), as xml.sax.saxutils.escape does; html is imported in a fraction of its time.
escape = functools.partial(html.escape, quote=False)

if TYPE_CHECKING:
    import libvirt

GIB = 1 << 30
_BASE, _LAYER = "pymachine-base-", "pymachine-engine-"  # the volumes machines share: images and engine layers
_QCOW2_MAGIC = b"QFI\xfb"
_CHUNK = 1 << 20


def image_info(path: Path) -> tuple[str, int]:
    """(format, virtual size in bytes) of a qcow2 or raw image."""
    with path.open("rb") as f:
        header = f.read(32)
    if header[:4] == _QCOW2_MAGIC:
        return "qcow2", struct.unpack(">Q", header[24:32])[0]
    return "raw", path.stat().st_size


def pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool:
    found = find_pool(conn, name)
    if found is None:
        raise MachineError(f"libvirt has no storage pool {name!r} (list them with `virsh pool-list --all`)")
    if not found.isActive():
        raise MachineError(f"storage pool {name!r} is not active (start it with `virsh pool-start {name}`)")
    return found


def find_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool | None:
    lv = libvirt_module()
    try:
        return conn.storagePoolLookupByName(name)
    except lv.libvirtError as e:
        if is_missing(e):
            return None
        raise MachineError(f"storage pool {name!r}: {message(e)}") from None


def create_default_pool(conn: libvirt.virConnect) -> libvirt.virStoragePool:
    """The directory pool `default` where virt-install would make it, for a libvirt that has none yet."""
    session = urlparse(conn.getURI()).path.rstrip("/") == "/session"
    path = Path.home() / ".local/share/libvirt/images" if session else Path("/var/lib/libvirt/images")
    xml = f"<pool type='dir'><name>default</name><target><path>{escape(str(path))}</path></target></pool>"
    lv = libvirt_module()
    pool = None
    try:
        pool = conn.storagePoolDefineXML(xml, 0)
        pool.build(0)  # a directory pool: mkdir (the no-overwrite flag is for formatting a device)
        pool.create(0)
        pool.setAutostart(1)
    except lv.libvirtError as e:
        if pool is not None:  # nothing half-made
            with contextlib.suppress(lv.libvirtError):
                if pool.isActive():
                    pool.destroy()
                pool.undefine()
        raise MachineError(f"cannot create the storage pool 'default' at {path}: {message(e)}") from None
    return pool


def find(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    lv = libvirt_module()
    try:
        return pool.storageVolLookupByName(name)
    except lv.libvirtError as e:
        if is_missing(e):
            return None
        raise MachineError(f"volume {name}: {message(e)}") from None


def base_volume(pool: libvirt.virStoragePool, image: Path, lock_dir: Path) -> libvirt.virStorageVol:
    """The pool's copy of a cached image (named by its sha256, the cache file's name), uploaded once."""
    fmt, _ = image_info(image)
    return _uploaded(pool, f"{_BASE}{image.name[:16]}.{fmt}", image, fmt, lock_dir)


def layer_volume(pool: libvirt.virStoragePool, layer: Path, base: libvirt.virStorageVol, base_format: str,
                 lock_dir: Path) -> libvirt.virStorageVol:
    """The pool's copy of an engine layer (drivers/libvirt/engine_layer.py: a generation's qcow2), uploaded once
    and backed by the base volume."""
    return _uploaded(pool, layer_volume_name(layer.parent), layer, "qcow2", lock_dir,
                     backing=(base.path(), base_format))


def layer_volume_name(generation: Path) -> str:
    """The volume of an engine layer's generation: named by its layer (slot) and generation."""
    return f"{_LAYER}{generation.parent.name}-{generation.name}.qcow2"


def is_layer(volume: str) -> bool:
    return volume.startswith(_LAYER)


def prune(pool: libvirt.virStoragePool, removable: Callable[[str], bool], dry_run: bool) -> list[tuple[str, int]]:
    """Delete the pool's copies of images and engine layers that no volume is backed by and `removable(name)`
    allows, layers first (an image only they were backed by goes too); the name and bytes of each (with
    `dry_run`, of each that would go, and none goes)."""
    from xml.etree import ElementTree  # late: the quick commands load this module

    lv = libvirt_module()
    try:
        pool.refresh(0)
        volumes = {vol.name(): vol for vol in pool.listAllVolumes(0)}
        backing = {name: ElementTree.fromstring(vol.XMLDesc(0)).findtext("backingStore/path")
                   for name, vol in volumes.items()}
    except lv.libvirtError as e:
        raise MachineError(f"storage pool {pool.name()}: {message(e)}") from None
    removed: list[tuple[str, int]] = []
    for prefix in (_LAYER, _BASE):
        gone = {name for name, _ in removed}
        used = {path for name, path in backing.items() if name not in gone}
        for name, vol in sorted(volumes.items()):
            if name.startswith(prefix) and vol.path() not in used and removable(name):
                removed.append((name, _physical_size(vol)))
                if not dry_run:
                    delete(pool, name)
    return removed


def _uploaded(pool: libvirt.virStoragePool, name: str, path: Path, fmt: str, lock_dir: Path,
              backing: tuple[str, str] | None = None) -> libvirt.virStorageVol:
    """The volume `name` holding the file at `path`, uploaded unless the pool has it whole; with `backing` (path,
    format), the volume's qcow2 header names that backing file instead of the cached file's own."""
    size = path.stat().st_size
    with file_lock(lock_dir / ".pool.lock", timeout=3600, what=f"volume {name}"):
        existing = find(pool, name)
        if existing is not None and _physical_size(existing) == size:
            return existing
        if existing is not None:  # torn by an upload that was killed: never a disk's backing file
            existing.delete()
        vol = _create(pool, name, fmt, size, mode="0644")
        try:
            with _backed_by(path, backing) if backing else contextlib.nullcontext():
                _upload(pool, vol, path.open("rb"), size)
        except BaseException:
            _discard(vol)
            raise
        return vol


@contextlib.contextmanager
def _backed_by(path: Path, backing: tuple[str, str]) -> Iterator[None]:
    """For the block, the qcow2 at `path` names `backing` as its backing file (`rebase -u` rewrites only the
    header, whose size does not change); then again the one it named."""
    info = json.loads(qemu_img("info", "--output=json", str(path)))
    qemu_img("rebase", "-u", "-F", backing[1], "-b", backing[0], str(path))
    try:
        yield
    finally:
        qemu_img("rebase", "-u", "-F", info["backing-filename-format"], "-b", info["backing-filename"], str(path))


def qemu_img(*args: str) -> str:
    """Run qemu-img; its output (MachineError with its last line when it fails)."""
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise MachineError(f"qemu-img {args[0]} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def overlay(pool: libvirt.virStoragePool, name: str, base: libvirt.virStorageVol, base_format: str,
            capacity: int) -> libvirt.virStorageVol:
    """A qcow2 volume of `capacity` bytes whose unwritten blocks read from `base`."""
    # qcow2 v3 (compat 1.1): only it records zero clusters, so the zeroes the guest writes (inode tables
    # when cloud-init grows the root filesystem) stay holes instead of ~43 MiB of data. libvirt's default is 0.10.
    xml = f"""<volume>
  <name>{escape(name)}</name>
  <capacity unit='bytes'>{capacity}</capacity>
  <target><format type='qcow2'/><compat>1.1</compat></target>
  <backingStore><path>{escape(base.path())}</path><format type='{base_format}'/></backingStore>
</volume>"""
    lv = libvirt_module()
    try:
        return pool.createXML(xml, 0)
    except lv.libvirtError as e:
        raise MachineError(f"cannot create volume {name}: {message(e)}") from None


def _physical_size(vol: libvirt.virStorageVol) -> int:
    lv = libvirt_module()
    try:
        return vol.infoFlags(lv.VIR_STORAGE_VOL_GET_PHYSICAL)[2]
    except lv.libvirtError as e:
        raise MachineError(f"volume {vol.name()}: {message(e)}") from None


def upload_bytes(pool: libvirt.virStoragePool, name: str, data: bytes) -> libvirt.virStorageVol:
    vol = _create(pool, name, "raw", len(data), mode="0644")
    try:
        _upload(pool, vol, io.BytesIO(data), len(data))
    except BaseException:
        _discard(vol)
        raise
    return vol


def _discard(vol: libvirt.virStorageVol) -> None:
    """Delete a volume whose upload failed, if libvirtd still can: the upload's error is the one to tell (a torn
    copy of an image is replaced by the next upload, a machine's seed is removed with the machine)."""
    with contextlib.suppress(libvirt_module().libvirtError):
        vol.delete()


def delete(pool: libvirt.virStoragePool, name: str) -> None:
    vol = find(pool, name)
    if vol is not None:
        lv = libvirt_module()
        try:
            vol.delete()
        except lv.libvirtError as e:
            raise MachineError(f"cannot delete volume {name}: {message(e)}") from None


def _create(pool: libvirt.virStoragePool, name: str, fmt: str, size: int, mode: str) -> libvirt.virStorageVol:
    xml = f"""<volume>
  <name>{escape(name)}</name>
  <capacity unit='bytes'>{size}</capacity>
  <allocation unit='bytes'>0</allocation>
  <target><format type='{fmt}'/><permissions><mode>{mode}</mode></permissions></target>
</volume>"""
    lv = libvirt_module()
    try:
        return pool.createXML(xml, 0)
    except lv.libvirtError as e:
        raise MachineError(f"cannot create volume {name}: {message(e)}") from None


def _upload(pool: libvirt.virStoragePool, vol: libvirt.virStorageVol, source, size: int) -> None:
    """Stream `source` into the volume through libvirtd (which also works for a remote libvirtd)."""
    lv = libvirt_module()
    conn = pool.connect()
    stream = conn.newStream(0)
    try:
        with source:
            vol.upload(stream, 0, size, 0)
            stream.sendAll(lambda _s, n, f: f.read(min(n, _CHUNK)), source)
            stream.finish()
    except lv.libvirtError as e:
        with contextlib.suppress(lv.libvirtError):  # the connection may be what failed
            stream.abort()
        raise MachineError(f"cannot upload volume {vol.name()}: {message(e)}") from None
    pool.refresh(0)  # libvirt re-reads the uploaded image's format and size
