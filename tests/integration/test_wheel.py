"""The wheel users install: one top-level package, and it works without the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    return next(out.glob("pymachine-*.whl"))


def test_the_wheel_installs_nothing_but_machine_at_the_top(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist() if ".dist-info/" not in name}
        names = archive.namelist()
    assert tops == {"machine"}
    assert "machine/drivers/local/__init__.py" in names
    assert "machine/data/roles/engine/tasks/main.yml" in names


def test_the_installed_wheel_runs_outside_the_source_tree(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    # The project's own venv already holds every dependency: reuse it, so the test needs no index.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    site = subprocess.run([str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    parent_site = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                 check=True, capture_output=True, text=True).stdout.strip()
    # The project venv's editable install points at the source tree; only its dependencies may be seen.
    (Path(site) / "deps.pth").write_text(parent_site + "\n")
    env = {"PATH": "/usr/bin:/bin", "PYMACHINE_HOME": str(tmp_path / "store"), "HOME": str(tmp_path)}
    probe = ("import machine, machine.drivers.local, machine.paths as p; "
             "print(machine.__file__); print(p.data_dir('roles')); print(p.data_dir('templates'))")
    out = subprocess.run([str(venv / "bin/python"), "-I", "-c", probe], cwd=tmp_path, env=env,
                         check=True, capture_output=True, text=True).stdout.split()
    assert all(line.startswith(site) for line in out), out
    help_text = subprocess.run([str(venv / "bin/python"), "-I", "-m", "machine", "create", "--help"], cwd=tmp_path,
                               env=env, check=True, capture_output=True, text=True).stdout
    assert "--ec2-region" in help_text and "--generic-ip-address" in help_text
    listing = subprocess.run([str(venv / "bin/python"), "-I", "-m", "machine", "ls", "-q"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert listing.returncode == 0 and listing.stdout == "", listing.stderr
