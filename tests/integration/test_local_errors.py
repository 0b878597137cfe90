"""Refusals that depend on the host: not root, missing tools, a bridge name the host uses. Nothing may be created."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine.drivers.local import network, rootfs

pytestmark = pytest.mark.integration


def test_create_without_root_is_refused(local):
    proc = local.run(["unshare", "--user"], "create", "--no-provision", "nonroot")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "pymachine: error: the local driver needs root (it runs systemd-nspawn and configures a bridge)"
    )
    assert not (local.home / "machines/nonroot").exists()


def test_create_without_systemd_nspawn_is_refused(local, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ip", "iptables", "unshare", "debootstrap", "tar"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    local.env["PATH"] = str(bin_dir)
    proc = local("create", "--no-provision", "notools", check=False)
    assert proc.returncode == 1 and "needs systemd-nspawn on PATH" in proc.stderr
    assert not (local.home / "machines/notools").exists()


@pytest.fixture
def foreign_bridge() -> Iterator[str]:
    """A bridge of the host's own (made as an administrator would, with a MAC of the kernel's choosing)."""
    name = "pmforeign0"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def test_create_on_a_bridge_the_host_already_has_is_refused(local, foreign_bridge):
    proc = local("create", "--no-provision", "--local-bridge", foreign_bridge, "--local-subnet", "10.231.244.0/24",
                 "onhost", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"pymachine: error: --local-bridge {foreign_bridge}: the host's interface "
                                   f"{foreign_bridge} was not made by pymachine; choose another name")
    assert not (local.home / "machines/onhost").exists()
    assert Path("/sys/class/net", foreign_bridge).exists()


def test_the_last_lease_out_never_takes_the_host_s_own_bridge(foreign_bridge, tmp_path, monkeypatch):
    # A lease left on such a bridge (by a version that did not refuse it): its release removes pymachine's rules
    # and keeps the interface.
    monkeypatch.setattr(network, "STATE_DIR", tmp_path)
    bridge = network.Network.parse(foreign_bridge, "10.231.244.0/24")
    (tmp_path / f"{foreign_bridge}.json").write_text(json.dumps(
        {"subnet": "10.231.244.0/24", "leases": {"10.231.244.2": str(tmp_path)}}))
    bridge.release(str(tmp_path))
    assert Path("/sys/class/net", foreign_bridge).exists()
    assert not (tmp_path / f"{foreign_bridge}.json").exists()


def test_create_over_a_base_that_lost_its_rootfs_says_so_and_leaves_nothing(local, tmp_path):
    """A base marked complete in the cache whose rootfs is gone: not a machine to remove (start's "remove it with
    `pymachine rm`"), but a cache to mend."""
    cache, mirror = tmp_path / "cache", "http://deb.debian.org/debian"  # never asked: the create stops first
    root = cache / "local" / rootfs.DIR / rootfs.debootstrap_key("bookworm", mirror)
    root.mkdir(parents=True)
    (root / rootfs.READY).touch()
    local.env |= {"PYMACHINE_CACHE": str(cache), "PYMACHINE_LOCAL_RELEASE": "bookworm",
                  "PYMACHINE_LOCAL_MIRROR": mirror}
    proc = local("create", "--no-provision", "nobase", check=False)
    assert (proc.returncode, proc.stderr) == (1, f"pymachine: error: the base image {root} has lost its rootfs: remove "
                                                 f"it (`pymachine cache prune --all`, once no machine uses it) and "
                                                 f"create again to rebuild it\n")
    assert local("ls", "-q").stdout == "" and not list((local.home / "machines").iterdir())
    assert not list((root / "users").iterdir())  # the create's mark went with it
