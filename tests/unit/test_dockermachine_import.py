"""`pymachine import` refuses, in one line and writing nothing, what is not a usable docker-machine machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "machine", "import", *args], capture_output=True, text=True,
                          env={"PYMACHINE_HOME": str(home), "PATH": "/usr/bin:/bin", "HOME": str(home.parent)})


def machine_dir(store: Path, name: str, record: object) -> Path:
    directory = store / "machines" / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(record))
    return directory


DM_RECORD = {"ConfigVersion": 3, "Name": "dm1", "DriverName": "generic", "HostOptions": {},
             "Driver": {"IPAddress": "127.0.0.1", "SSHUser": "root", "SSHPort": 22}}


@pytest.mark.parametrize(("case", "message"), [
    ("pymachine's own store", "config.json: not docker-machine's config.json (no Driver, DriverName and HostOptions)"),
    ("not json", "config.json: not docker-machine's config.json ("),
    ("no such machine", "has no docker-machine machine 'dm1'"),
    ("no address", "docker-machine recorded no IP address for 'dm1'"),
    ("no certificates", "lacks ca.pem, cert.pem, key.pem, server.pem, server-key.pem: import it with --regen"),
])
def test_what_cannot_be_imported_is_one_line_and_nothing_is_written(tmp_path: Path, case: str, message: str):
    dm = tmp_path / "dm"
    (dm / "machines").mkdir(parents=True)
    if case == "pymachine's own store":
        machine_dir(dm, "dm1", {"name": "dm1", "driver": "local", "id": "x", "options": {}, "resources": {}})
    elif case == "not json":
        (machine_dir(dm, "dm1", {}) / "config.json").write_text("{")
    elif case == "no address":
        machine_dir(dm, "dm1", {**DM_RECORD, "Driver": {"IPAddress": ""}})
    elif case == "no certificates":
        machine_dir(dm, "dm1", DM_RECORD)
    home = tmp_path / "home"
    proc = run(home, str(dm), "dm1")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymachine: error: ") and message in lines[0], proc.stderr
    assert not (home / "machines").exists() or not any((home / "machines").iterdir())


def test_a_store_without_names_is_refused(tmp_path: Path):
    (tmp_path / "dm" / "machines").mkdir(parents=True)
    proc = run(tmp_path / "home", str(tmp_path / "dm"))
    assert proc.returncode == 2 and "import: name the machines of" in proc.stderr
