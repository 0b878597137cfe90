"""`pymachine apply`: a fleet of two local machines made, left alone, re-provisioned, swarmed and pruned."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from machine.commands import swarm
from machine.drivers.local.network import Network
from machine.errors import MachineError
from machine.store import Store
from tests.conftest import CLI
from tests.integration.conftest import (
    BRIDGE,
    SUBNET,
    bridge_leftovers,
    docker,
    leftovers,
    machine_cli,
    machine_record,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Iterator[CLI]:
    tmp = tmp_path_factory.mktemp("apply")
    yield from machine_cli(tmp / "home", DOCKER_CONFIG=str(tmp / "docker-config"))


def fleet(path: Path, web1: dict | None = None, web2: bool = True, web2_swarm: str | None = "worker",
          first: str = "web1") -> Path:
    """web1 (or `first`) manages a swarm that web2 joins (with the role `web2_swarm`; None: no `swarm:`), and runs
    the file's own role `stamp`; `web1` adds keys to its entry."""
    tasks = path.parent / "roles" / "stamp" / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "main.yml").write_text("- name: stamp\n  copy: {dest: /etc/fleet-stamp, content: \"{{ stamp }}\\n\"}\n")
    web1_entry = {"swarm": "manager", "roles": ["stamp"], "vars": {"stamp": "one"}, **(web1 or {})}
    machines = {first: web1_entry} | ({"web2": {"swarm": web2_swarm} if web2_swarm else {}} if web2 else {})
    data = {"name": "test-apply", "defaults": {"engine_install": "distro"}, "machines": machines}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def plan_lines(stdout: str) -> list[tuple[str, str]]:
    """(action, machine) of each of apply's plan lines, in order."""
    rows = [line.split("(")[0].split() for line in stdout.splitlines() if line.startswith("  ")]
    return [(" ".join(row[:-1]), row[-1]) for row in rows]


def labels(cli: CLI, name: str) -> list[str]:
    return json.loads(docker(cli, name, "info", "--format", "{{json .Labels}}"))


def roles(cli: CLI, manager: str) -> list[tuple[str, str]]:
    """(machine, role) of the swarm's nodes, as `pymachine swarm ls MANAGER` shows them."""
    return sorted((n["machine"], n["role"]) for n in json.loads(cli("swarm", "ls", "--format", "json", manager).stdout))


def test_apply_makes_keeps_reprovisions_and_prunes_only_its_own(cli, tmp_path):
    cli("create", "--no-provision", "hand1", timeout=900)  # made by hand: apply --prune must leave it
    path = fleet(tmp_path / "fleet.yaml")

    first = cli("apply", str(path), timeout=1800)
    assert plan_lines(first.stdout) == [("create", "web1"), ("create", "web2"), ("swarm init", "web1"),
                                        ("join as worker", "web2")]
    assert roles(cli, "web1") == [("web1", "manager"), ("web2", "worker")]
    assert machine_record(cli, "web1")["fleet"]["name"] == "test-apply"
    assert cli("ssh", "web1", "--", "cat", "/etc/fleet-stamp").stdout == "one\n"
    assert machine_record(cli, "hand1")["fleet"] == {}
    # The fleet's machines come with the engine's packages from the engine cache, as `create`'s do.
    assert all(machine_record(cli, name)["resources"].get("engine_layer") for name in ("web1", "web2"))

    again = cli("apply", str(path), timeout=900)
    assert again.stdout.strip().splitlines()[-1] == "2 machines unchanged"

    # A stopped fleet: started and provisioned; its manager, stopped at plan time, still manages its swarm (no
    # `swarm init`, which would fail: already in a swarm).
    cli("stop", "web1", "web2")
    started = cli("apply", str(path), timeout=900)
    assert plan_lines(started.stdout) == [("re-provision", "web1"), ("re-provision", "web2")]
    assert roles(cli, "web1") == [("web1", "manager"), ("web2", "worker")]

    # Drift on the machine: a file provisioning wrote is deleted by hand; a check-mode run finds it.
    cli("ssh", "web2", "--", "rm", "/etc/modules-load.d/pymachine.conf")
    drifted = cli("apply", str(path), timeout=900)
    assert plan_lines(drifted.stdout) == [("unchanged", "web1"), ("re-provision", "web2")]
    assert "drifted" in drifted.stdout
    assert cli("ssh", "web2", "--", "test", "-s", "/etc/modules-load.d/pymachine.conf", check=False).returncode == 0

    # An engine option edited in the file: only that machine is re-provisioned, and its engine has it.
    fleet(path, web1={"engine_label": ["team=web"]})
    edited = cli("apply", str(path), timeout=900)
    assert plan_lines(edited.stdout) == [("re-provision", "web1"), ("unchanged", "web2")]
    assert "team=web" in labels(cli, "web1") and "team=web" not in labels(cli, "web2")

    # Swarm roles swapped in the file, through the engines' API: web2 is promoted before web1 is demoted (the
    # swarm keeps a manager throughout), although the file names web1 first.
    label = {"engine_label": ["team=web"]}
    fleet(path, web1={**label, "swarm": "worker"}, web2_swarm="manager")
    swapped = cli("apply", str(path), timeout=900)
    assert plan_lines(swapped.stdout) == [("unchanged", "web1"), ("unchanged", "web2"), ("promote", "web2"),
                                          ("demote", "web1")]
    assert "(worker → manager)" in swapped.stdout and "1 promoted, 1 demoted" in swapped.stdout
    assert roles(cli, "web2") == [("web1", "worker"), ("web2", "manager")]
    assert machine_record(cli, "web1")["fleet"]["swarm"] == "worker"
    # The swarm's last manager is never demoted: one line, and nothing changes.
    with pytest.raises(MachineError) as refused:
        swarm.set_role(Store(cli.home), "web2", "worker")
    assert str(refused.value) == ("web2 is the last manager of its swarm: it stays a manager (make another "
                                  "machine a manager first)")
    assert roles(cli, "web2") == [("web1", "worker"), ("web2", "manager")]
    # `swarm:` taken away from the manager web2 while web1 becomes one again: web1 is promoted, then web2 is demoted
    # and leaves (a manager that left as one would take its vote along: web1 alone would have no quorum, and
    # `swarm ls` could not list the nodes); given `swarm:` back, web2 joins again.
    fleet(path, web1=label, web2_swarm=None)
    left = cli("apply", str(path), timeout=900)
    assert plan_lines(left.stdout)[2:] == [("promote", "web1"), ("leave the swarm", "web2")]
    assert roles(cli, "web1") == [("web1", "manager")]
    fleet(path, web1=label)
    rejoined = cli("apply", str(path), timeout=900)
    assert plan_lines(rejoined.stdout)[2:] == [("join as worker", "web2")]
    assert roles(cli, "web1") == [("web1", "manager"), ("web2", "worker")]
    # web2 leaves by hand, then the file takes its `swarm:` away: the leave its record asks for is done already.
    cli("swarm", "leave", "web2")
    fleet(path, web1=label, web2_swarm=None)
    gone = cli("apply", str(path), timeout=900)
    assert plan_lines(gone.stdout)[2:] == [("leave the swarm", "web2")]
    assert "done leave the swarm web2: it was in no swarm" in gone.stdout
    assert machine_record(cli, "web2")["fleet"]["swarm"] == ""

    # web1, the swarm's only manager, is renamed front (web2 a worker again): kept without --prune; with it, front
    # joins through web1 before web1 leaves (demoted first: front keeps the swarm) and is removed.
    fleet(path, web1=label, first="front")
    front = [("create", "front"), ("unchanged", "web2"), ("join as manager", "front"), ("join as worker", "web2")]
    kept = cli("apply", "--dry-run", str(path), timeout=900)
    assert plan_lines(kept.stdout) == [*front, ("keep", "web1")]
    web1 = machine_record(cli, "web1")
    pruned = cli("apply", "--prune", str(path), timeout=1800)
    assert plan_lines(pruned.stdout) == [*front, ("remove", "web1")]
    assert cli("ls", "-q").stdout.split() == ["front", "hand1", "web2"]
    assert leftovers(web1, cli.home / "machines" / "web1") == []
    assert roles(cli, "front") == [("front", "manager"), ("web2", "worker")]  # web1 left before it was removed

    records = {name: machine_record(cli, name) for name in ("hand1", "front", "web2")}
    cli("rm", "-y", "hand1", "front", "web2")
    for name, record in records.items():
        assert leftovers(record, cli.home / "machines" / name) == []
    assert bridge_leftovers() == []


@pytest.fixture
def full_subnet(tmp_path) -> Iterator[None]:
    """Every address of the test subnet that is free now leased to a stand-in owner, given back at the end."""
    subnet = Network.parse(BRIDGE, SUBNET)
    owner = tmp_path / "stand-in"
    owner.mkdir()
    try:
        with contextlib.suppress(MachineError):  # "no free address left"
            while True:
                subnet.lease(str(owner))
        yield
    finally:
        subnet.release(str(owner))


def test_prune_frees_a_renamed_machine_s_address_before_its_successor_is_made(local, quick_roles, tmp_path,
                                                                                  request):
    """`old` in no swarm, renamed `new` in the file on a subnet with no address free: --prune removes `old` first,
    and `new` is made on its address."""
    local.env["PYMACHINE_ROLES_PATH"] = str(quick_roles)
    path = tmp_path / "fleet.yaml"
    fleet = "name: renamed\ndefaults: {local_engine_layer: false}\nmachines:\n"
    path.write_text(fleet + "  old: {}\n")
    local("apply", str(path))
    old = machine_record(local, "old")
    request.getfixturevalue("full_subnet")
    path.write_text(fleet + "  new: {}\n")
    applied = local("apply", "--prune", str(path), check=False)
    assert applied.returncode == 0, applied.stderr
    assert plan_lines(applied.stdout) == [("remove", "old"), ("create", "new")]
    assert local("ls", "-q").stdout.split() == ["new"]
    assert machine_record(local, "new")["resources"]["ip"] == old["resources"]["ip"]
    gone = {**old, "resources": {k: v for k, v in old["resources"].items() if k != "ip"}}  # new's address now
    assert leftovers(gone, local.home / "machines" / "old") == []
