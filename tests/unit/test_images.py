import hashlib

import pytest

from machine import images
from machine.errors import MachineError, UsageError


def test_fetch_verifies_and_caches_by_checksum(tmp_path):
    source = tmp_path / "image.tar"
    source.write_bytes(b"rootfs" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    cached = images.fetch(str(source), tmp_path / "cache", digest)
    assert cached.name == digest and cached.read_bytes() == source.read_bytes()
    source.unlink()  # a second fetch with the checksum is served from the cache
    assert images.fetch(str(source), tmp_path / "cache", digest) == cached


def test_checksum_mismatch_caches_nothing(tmp_path):
    source = tmp_path / "image.tar"
    source.write_bytes(b"tampered")
    with pytest.raises(MachineError, match="checksum mismatch"):
        images.fetch(source.as_uri(), tmp_path / "cache", "0" * 64)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]


@pytest.mark.parametrize(("source", "sha"), [("ftp://x/y", None), ("/no/such/file", None), ("/", "xyz")])
def test_bad_sources_are_refused_up_front(source, sha):
    with pytest.raises(UsageError):
        images.check_source(source, sha)
