"""Refusals that depend on the host: not root, missing tools. Nothing may be created."""

from __future__ import annotations

import os
import shutil

import pytest

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
