"""Writing an overlay's upper directory onto an image's root, and finding that root in a disk image."""

from __future__ import annotations

import os
import subprocess

import pytest

from machine.drivers.libvirt import engine_layer

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts (mknod) and trusted xattrs need root")


@root_only
def test_an_upper_directory_is_applied_with_its_whiteouts_opaque_directories_and_metadata(tmp_path):
    root, upper = tmp_path / "root", tmp_path / "upper"
    for directory in (root / "etc/gone.d", root / "etc/replaced.d", root / "usr/bin", root / "kept"):
        directory.mkdir(parents=True)
    (root / "etc/gone").write_text("removed by the build\n")
    (root / "etc/gone.d/a").write_text("a\n")
    (root / "etc/replaced.d/old").write_text("old\n")
    (root / "usr/bin/tool").write_text("old tool\n")
    (root / "kept/file").write_text("untouched\n")
    (root / "etc/link").symlink_to("gone")

    for directory in (upper / "etc/replaced.d", upper / "usr/bin", upper / "var/new"):
        directory.mkdir(parents=True)
    os.mknod(upper / "etc/gone", 0o600 | 0o020000, os.makedev(0, 0))  # whiteouts of a file and a directory
    os.mknod(upper / "etc/gone.d", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(upper / "etc/replaced.d", "trusted.overlay.opaque", b"y")
    (upper / "etc/replaced.d/new").write_text("new\n")
    tool = upper / "usr/bin/tool"
    tool.write_text("new tool\n")
    os.chown(tool, 0, 50)
    tool.chmod(0o4755)  # set-uid: kept though the copy is chowned
    os.setxattr(tool, "security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00" + b"\x00" * 12)
    (upper / "etc/link").symlink_to("replaced.d/new")
    (upper / "var/new/data").write_text("data\n")

    engine_layer._apply(upper, root)

    assert not (root / "etc/gone").exists() and not (root / "etc/gone.d").exists()
    assert sorted(p.name for p in (root / "etc/replaced.d").iterdir()) == ["new"]  # opaque: the old one is gone
    assert "trusted.overlay.opaque" not in os.listxattr(root / "etc/replaced.d")
    target = root / "usr/bin/tool"
    assert target.read_text() == "new tool\n"
    assert (target.stat().st_mode & 0o7777, target.stat().st_gid) == (0o4755, 50)
    assert os.getxattr(target, "security.capability")[:4] == b"\x01\x00\x00\x02"
    assert os.readlink(root / "etc/link") == "replaced.d/new"
    assert (root / "var/new/data").read_text() == "data\n" and (root / "kept/file").read_text() == "untouched\n"


@root_only
def test_hard_links_stay_links_kinds_swap_and_directories_keep_their_times(tmp_path):
    root, upper = tmp_path / "root", tmp_path / "upper"
    (root / "was-dir").mkdir(parents=True)
    (root / "was-dir/inside").write_text("x\n")
    (root / "was-file").write_text("file\n")
    (upper / "usr/bin").mkdir(parents=True)
    (upper / "was-dir").write_text("now a file\n")
    (upper / "was-file").mkdir()
    (upper / "was-file/inside").write_text("now a directory\n")
    (upper / "usr/bin/tool").write_text("tool\n")
    os.link(upper / "usr/bin/tool", upper / "usr/bin/tool-alias")
    os.utime(upper / "usr", ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))

    engine_layer._apply(upper, root)

    assert (root / "was-dir").read_text() == "now a file\n"
    assert (root / "was-file/inside").read_text() == "now a directory\n"
    assert os.stat(root / "usr/bin/tool").st_ino == os.stat(root / "usr/bin/tool-alias").st_ino
    assert os.stat(root / "usr").st_mtime_ns == 1_000_000_000_000_000_000  # not the time of the writes inside


def test_the_root_filesystem_is_the_largest_partition_or_the_whole_image(tmp_path):
    disk, bare = tmp_path / "disk.raw", tmp_path / "fs.raw"
    disk.write_bytes(b"")
    os.truncate(disk, 64 << 20)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\nstart=2048, size=2048\nstart=8192, size=65536\n",
                   text=True, check=True, capture_output=True)
    assert engine_layer._root_partition(disk) == (8192 * 512, 65536 * 512)  # not the small one first
    bare.write_bytes(b"")
    os.truncate(bare, 8 << 20)
    assert engine_layer._root_partition(bare) == (0, 8 << 20)
