"""Many real local machines in one command: created and provisioned in parallel, one of them failing half-way
without stopping the others; then stopped, started and removed in parallel, leaving nothing."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from machine.drivers.local import cgroups
from tests.conftest import CLI
from tests.integration.conftest import bridge_leftovers, journal_record, leftovers, machine_cli, machine_record
from tests.integration.test_engine import build_busybox, docker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Iterator[CLI]:
    tmp = tmp_path_factory.mktemp("fleet")
    yield from machine_cli(tmp / "home", DOCKER_CONFIG=str(tmp / "docker-config"), DOCKER_BUILDKIT="0")


def kill_once_booted(cli: CLI, name: str, deadline: float) -> dict:
    """Wait until `name`'s create has started its machine, then kill every process of it, as a crash would;
    return what its journal recorded (for leftovers())."""
    journal = cli.home / "machines" / name / "journal"
    while time.monotonic() < deadline:
        try:
            record = journal_record(cli, name)
        except (FileNotFoundError, json.JSONDecodeError):  # not made yet, or a line being written
            record = {"resources": {}}
        if "pid" in record["resources"]:
            cgroups.kill_all(record["resources"]["cgroups"])
            return record
        time.sleep(0.05)
    raise AssertionError(f"{name} never started ({journal})")


@pytest.fixture(scope="module")
def fleet(cli) -> tuple[subprocess.CompletedProcess[str], dict]:
    """`create f1 f2 f3` with the engine, f2's machine killed while it is being made."""
    killed: dict = {}
    killer = threading.Thread(target=lambda: killed.update(kill_once_booted(cli, "f2", time.monotonic() + 600)))
    killer.start()
    proc = cli("create", "--engine-install", "distro", "f1", "f2", "f3", check=False, timeout=1800)
    killer.join()
    return proc, killed


def test_one_failure_leaves_the_others_ready_and_is_named_in_the_summary(cli, fleet, tmp_path):
    proc, killed = fleet
    assert proc.returncode == 1, proc.stderr
    errors = proc.stderr.splitlines()  # the summary: the one failure, naming its machine
    assert len(errors) == 1 and errors[0].startswith("pymachine: error: f2: "), proc.stderr + proc.stdout
    lines = proc.stdout.splitlines()  # outside a terminal, each machine's progress as plain lines
    assert {"f1: ready", "f3: ready"} <= set(lines) and any(line.startswith("f2: failed: ") for line in lines)
    assert any(line.startswith("f1: provisioning: ") for line in lines)
    assert cli("ls", "-q").stdout.split() == ["f1", "f3"]
    assert leftovers(killed, cli.home / "machines" / "f2") == []  # rolled back
    for name in ("f1", "f3"):
        build_busybox(cli, name, tmp_path)
        out = docker(cli, name, "run", "--rm", "pm-busybox", "echo", f"hello from {name}").stdout
        assert out.strip() == f"hello from {name}"


def test_count_then_stop_start_and_rm_of_many_names_leave_nothing(cli, fleet):
    cli("create", "--no-provision", "--count", "2", "c")
    names = ["f1", "f3", "c1", "c2"]
    assert cli("ls", "-q").stdout.split() == sorted(names)
    cli("stop", *names)
    assert [cli("status", n).stdout.strip() for n in names] == ["Stopped"] * 4
    out = cli("start", "c1", "c2").stdout.splitlines()
    assert {"c1: running", "c2: running"} <= set(out)
    assert [cli("status", n).stdout.strip() for n in ("c1", "c2")] == ["Running"] * 2
    records = {n: machine_record(cli, n) for n in names}
    cli("rm", "-y", *names)
    assert cli("ls", "-q").stdout.strip() == ""
    for name, record in records.items():
        assert leftovers(record, cli.home / "machines" / name) == [], name
    assert bridge_leftovers() == []
