"""The native executor and ansible-playbook agree: same role, two fresh machines, same changes, same files.

tests/integration/parity_fixture/roles/parity exercises template, copy, lineinfile, file (directory, link),
command with `creates`, a handler, a loop, `when` (on a fact and on a variable), register and assert.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine import commands
from machine.roles import run_roles
from machine.roles.report import SilentReporter, TaskInfo, TaskResult
from machine.store import Store
from tests.conftest import CLI
from tests.integration.conftest import machine_cli
from tests.integration.test_inventory import ansible_env, run

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).parent / "parity_fixture"
# Every path the role manages, with type, mode, owner, link target and (for files) content checksum.
FILE_STATE = ("cd /etc/parity && find . -printf '%p %y %m %u:%g %l\\n' | sort "
              "&& find . -type f -exec sha256sum {} + | sort -k2")


class Recorder(SilentReporter):
    """The native run's results in the parity_record callback's shape (which leaves fact gathering out)."""

    def __init__(self) -> None:
        self.records: list[dict[str, str | None]] = []

    def task_result(self, host: str, task: TaskInfo, result: TaskResult) -> None:
        if task.action != "setup":
            self.records.append({"task": task.label, "item": result.item, "status": result.status})


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Iterator[CLI]:
    yield from machine_cli(tmp_path_factory.mktemp("parity") / "home")


@pytest.fixture(scope="module")
def machines(cli) -> tuple[str, str]:
    for name in ("par-native", "par-ansible"):
        cli("create", "--no-provision", name)
    return "par-native", "par-ansible"


def native_run(cli: CLI, name: str) -> list[dict]:
    recorder = Recorder()
    with commands.connect(*commands.load(Store(cli.home), name)) as conn:
        recap = run_roles(conn, ["parity"], FIXTURE / "roles", reporter=recorder, host_name=name)
    assert not recap.failed, recap.failure
    return recorder.records


def ansible_run(cli: CLI, name: str, tmp: Path) -> list[dict]:
    record = tmp / f"record-{os.urandom(4).hex()}.jsonl"
    inventory = tmp / "inventory.yml"
    inventory.write_text(cli("inventory").stdout)
    env = {**ansible_env(cli, tmp), "ANSIBLE_ROLES_PATH": str(FIXTURE / "roles"), "PARITY_RECORD": str(record),
           "ANSIBLE_CALLBACK_PLUGINS": str(FIXTURE / "callback_plugins"), "ANSIBLE_CALLBACKS_ENABLED": "parity_record",
           "ANSIBLE_PIPELINING": "true"}
    run(["ansible-playbook", "-i", str(inventory), "--limit", name, str(FIXTURE / "site.yml")], env)
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_native_and_ansible_report_the_same_changes_and_leave_the_same_files(cli, machines, tmp_path):
    native, ansible = machines
    first = native_run(cli, native), ansible_run(cli, ansible, tmp_path)
    assert first[0] == first[1]
    statuses = {r["task"]: r["status"] for r in first[0] if r["item"] is None}
    # Sanity: the run did what the role says, so the comparison is not between two no-ops.
    assert statuses["parity : Rendered configuration"] == "changed"
    assert statuses["parity : record the configuration"] == "changed"  # the handler ran
    assert statuses["parity : Only when asked for"] == "skipped"
    assert [r["status"] for r in first[0] if r["task"] == "parity : Sub-directories"] == ["changed", "changed"]

    second = native_run(cli, native), ansible_run(cli, ansible, tmp_path)
    assert second[0] == second[1]
    assert {r["status"] for r in second[0]} == {"ok", "skipped"}, second[0]

    files = [cli("ssh", name, "--", FILE_STATE).stdout for name in machines]
    assert files[0] == files[1]
    assert "./settings f 600 root:root" in files[0] and "./current.conf l 777 root:root parity.conf" in files[0]
