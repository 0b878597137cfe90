"""The entry point answers the quick commands' plain forms without click and without the modules only other
commands need (what keeps them quick), and sends everything else to the full command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from machine.store import Store

# Modules a quick command must not load: each costs it more than its whole answer.
HEAVY = ("click", "dataclasses", "subprocess", "tempfile", "hashlib", "ctypes", "cryptography", "jinja2", "yaml",
         "paramiko", "rich", "machine.cli", "machine.provision")

_RUN = """
import json, sys
from machine.entry import main
sys.argv = ["pymachine", *json.loads(sys.argv[1])]
try:
    main()
finally:
    print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)), file=sys.stderr)
"""


def run(home: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, list[str], str]:
    """Exit status, stdout, the heavy modules loaded, and stderr's other lines."""
    proc = subprocess.run([sys.executable, "-c", _RUN.format(heavy=HEAVY), json.dumps(args)],
                          capture_output=True, text=True, env={"PYMACHINE_HOME": str(home), "PATH": "/usr/bin:/bin",
                                                               **(env or {})})
    *errors, loaded = proc.stderr.splitlines()
    return proc.returncode, proc.stdout, json.loads(loaded), "\n".join(errors)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A store with one stopped local machine (its record only: no process has its PID)."""
    store = Store(tmp_path)
    with store.reserve("web1", "local", {"local_bridge": "pmbr0", "local_subnet": "10.231.0.0/24"}) as machine:
        machine.record(ip="10.231.0.7")
        machine.state = "ready"
        machine.save()
    return tmp_path


@pytest.mark.parametrize(("args", "status", "out"), [
    (("ip", "web1"), 0, "10.231.0.7\n"),
    (("status", "web1"), 0, "Stopped\n"),
    (("ls",), 0, "NAME   ACTIVE   DRIVER   STATE     URL                     ERRORS\n"
                 "web1   -        local    Stopped   tcp://10.231.0.7:2376\n"),
    (("url", "web1"), 1, ""),
    (("env", "web1"), 1, ""),
    (("config", "web1"), 1, ""),
    (("active",), 1, ""),
    (("ip", "nosuch"), 1, ""),
    (("ip", "../x"), 2, ""),
])
def test_plain_forms_answer_without_heavy_modules(home: Path, args: tuple[str, ...], status: int, out: str):
    code, stdout, loaded, errors = run(home, *args)
    assert (code, stdout, loaded) == (status, out, [])
    assert len(errors.splitlines()) == (status != 0)  # a failure is one line, as the full command line gives it


def test_failures_read_as_the_full_command_line_gives_them(home: Path):
    quick = run(home, "url", "web1")
    full = run(home, "url", "--", "web1")  # not the plain form: the full command line answers
    assert "click" in full[2]
    assert quick[0] == full[0] == 1
    assert quick[3] == full[3] == ("pymachine: error: machine 'web1' is not running "
                                   "(start it with `pymachine start web1`)")


@pytest.mark.parametrize("args", [("ls", "-q"), ("ip", "--help"), ("ip",), ("ip", "web1", "web2"), ("version",)])
def test_other_forms_go_to_the_full_command_line(home: Path, args: tuple[str, ...]):
    assert "click" in run(home, *args)[2]


def test_provision_of_one_machine_skips_the_full_command_line(home: Path):
    """`pymachine provision web1` re-checks a machine's configuration from scripts and loops: no click either."""
    quick = run(home, "provision", "web1")
    full = run(home, "provision", "--", "web1")
    assert not {"click", "machine.cli"} & set(quick[2]) and "click" in full[2]
    assert quick[0] == full[0] == 1
    assert quick[3] == full[3] == ("pymachine: error: machine 'web1' is not running "
                                   "(start it with `pymachine start web1`)")


def test_apply_of_a_fleet_file_skips_the_full_command_line(home: Path, tmp_path: Path):
    """`pymachine apply FLEET.yaml`, a CI job's or a loop's fleet check: no click, the same answers."""
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("name: f\nmachines:\n  web1: {driver: local}\n  web2: {driver: nosuch}\n")
    quick = run(home, "apply", str(fleet))
    full = run(home, "apply", "--", str(fleet))
    assert not {"click", "machine.cli"} & set(quick[2]) and "click" in full[2]
    assert quick[0] == full[0] == 2 and quick[1] == full[1] == ""
    assert quick[3] == full[3] and quick[3].startswith(f"pymachine: error: {fleet}:4: web2: ")
    # The argument is a file, not a machine name: a path with a slash is not refused as one would be.
    assert run(home, "apply", str(tmp_path / "missing.yaml"))[3] == \
        f"pymachine: error: {tmp_path / 'missing.yaml'}: cannot read: No such file or directory"
    # A directory: the same one line either way.
    assert run(home, "apply", str(tmp_path))[::3] == run(home, "apply", "--", str(tmp_path))[::3] == \
        (2, f"pymachine: error: {tmp_path}: cannot read: Is a directory")
