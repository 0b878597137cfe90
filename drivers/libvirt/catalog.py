"""Official cloud images known by a short name (`--libvirt-image debian-12`), pinned to a dated build."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from machine import images
from machine.errors import MachineError, UsageError
from machine.store import write_atomic

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CloudImage:
    url: str
    sha256: str | None = None
    # Debian publishes only SHA512SUMS for its cloud images.
    sha512: str | None = None


IMAGES = {
    "debian-12": CloudImage(
        "https://cloud.debian.org/images/cloud/bookworm/20250210-2019/debian-12-genericcloud-amd64-20250210-2019.qcow2",
        sha512="a58d86525d75fd8e139a2302531ce5d2ab75ef0273cfe78f9d53aada4b23efd45f8433b4806fa4570cfe981c8fae26f5e5e855"
               "cbd66ba2198862f28125fd2d45",
    ),
    "ubuntu-24.04": CloudImage(
        "https://cloud-images.ubuntu.com/releases/noble/release-20250313/ubuntu-24.04-server-cloudimg-amd64.img",
        sha256="eacac65efe9e9bae0cbcb3f9d5c2b5e8c5313fa78a3bc401c3fb28b2d48cefc0",
    ),
}
DEFAULT = "debian-12"


def resolve(image: str | None, sha256: str | None) -> CloudImage:
    """The image a user named (an alias, a URL or a path), validated without downloading it."""
    if not image or image in IMAGES:
        if sha256:
            raise UsageError("--libvirt-image-sha256 applies to an image given by URL or path, not to an alias")
        return IMAGES[image or DEFAULT]
    images.check_source(image, sha256)
    return CloudImage(image, sha256=sha256.lower() if sha256 else None)


def fetch(image: CloudImage, cache: Path) -> Path:
    """The cached, verified image file; downloaded once (a mismatch keeps nothing in the cache)."""
    if image.sha512 is None:
        return images.fetch(image.url, cache, image.sha256)
    # The cache is keyed by sha256: remember which sha256 the verified sha512 stands for.
    known = cache / f"sha512-{image.sha512[:32]}"
    sha256 = known.read_text().strip() if known.is_file() else None
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        sha256 = None  # a marker from before writes were atomic, torn by a crash: verify again
    path = images.fetch(image.url, cache, sha256)
    if sha256 is None:
        digest = hashlib.sha512()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != image.sha512:
            path.unlink()
            raise MachineError(f"checksum mismatch for {image.url}: expected sha512 {image.sha512}, "
                               f"got {digest.hexdigest()}")
        write_atomic(known, (path.name + "\n").encode(), 0o644)
    return path
