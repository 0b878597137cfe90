"""Fleet files: parsing, validation with file:line, and apply's plan against records in a real store."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from machine import fleetfile, provision
from machine.commands import apply
from machine.drivers.base import Driver, State
from machine.drivers.local import LocalDriver
from machine.errors import MachineError
from machine.fleetfile import FleetError
from machine.store import Machine, Store


def write(tmp_path: Path, text: str, name: str = "fleet.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


GOOD = """\
    name: shop
    defaults:
      engine_install: distro
      local_isolation: privileged
      vars: {region: north}
    machines:
      web:
        count: 3
        swarm: worker
        engine_label: {tier: web}
        engine_opt: {debug: true, max-concurrent-downloads: 5}
      mgr:
        swarm: manager
        engine_install: official
        vars: {role: lb}
        engine_default_address_pool: [{base: 10.99.0.0/16, size: 24}]
        tls_san: mgr.example.com
"""


def test_a_fleet_file_expands_counts_and_merges_defaults(tmp_path):
    fleet = fleetfile.load(write(tmp_path, GOOD))
    assert fleet.name == "shop"
    assert [m.name for m in fleet.machines] == ["web1", "web2", "web3", "mgr"]
    web1, mgr = fleet.machines[0], fleet.machines[3]
    # The same engine settings as `create --engine-install distro --engine-label tier=web --engine-opt …`.
    assert web1.engine == provision.engine_config(install="distro", labels=("tier=web",),
                                                  opts=("debug=true", "max-concurrent-downloads=5"))
    assert mgr.engine == provision.engine_config(install="official", tls_san=("mgr.example.com",),
                                                 address_pools=("base=10.99.0.0/16,size=24",))
    assert web1.options["local_isolation"] == mgr.options["local_isolation"] == "privileged"
    assert (web1.vars, mgr.vars) == ({"region": "north"}, {"region": "north", "role": "lb"})
    assert (web1.swarm, mgr.swarm, web1.where) == ("worker", "manager", f"{tmp_path / 'fleet.yaml'}:7")


def test_the_fleet_is_named_by_its_file_when_it_names_itself_not(tmp_path):
    fleet = fleetfile.load(write(tmp_path, "machines:\n  web1:\n"))
    assert fleet.name == str((tmp_path / "fleet.yaml").resolve())
    assert fleet.machines[0].driver == "local" and fleet.machines[0].engine == provision.engine_config()


@pytest.mark.parametrize("text, line, message", [
    ("machines:\n  web1:\n    engine_bipp: 10.1.0.1/24\n", 3, "web1: unknown engine option 'engine_bipp'"),
    ("machines:\n  web1:\n    engine-install: distro\n", 3, "web1: unknown key 'engine-install' (write it "
                                                              "engine_install)"),
    ("machines:\n  web1:\n    colour: red\n", 3, "web1: unknown key 'colour'"),
    ("machines:\n  web1: {}\n  db: {}\n  web1: {}\n", 4, "'web1' is given twice (also on line 2)"),
    ("machines:\n  web:\n    count: 2\n  web2: {}\n", 4, "web2: named twice (also at"),
    ("machines:\n  web_1:\n", 2, "invalid machine name 'web_1'"),
    ("machines:\n  web:\n    count: -1\n", 3, "count must be a whole number"),
    ("machines:\n  web1:\n    driver: vbox\n", 3, "unknown driver 'vbox'"),
    ("machines:\n  web1:\n    local_isolation: bogus\n", 3, "local_isolation: 'bogus' is not one of userns"),
    ("machines:\n  web1:\n    ec2_region: eu-west-1\n", 3, "ec2_region is not an option of the local driver"),
    ("machines:\n  web1:\n    local_bridge: [a, b]\n", 3, "local_bridge takes one value"),
    # A driver option takes YAML's value as it is: never truncated (2047.9), counted (true) or spelt (off, 'no').
    ("machines:\n  vm1:\n    driver: libvirt\n    libvirt_memory: 2047.9\n", 4,
     "vm1: libvirt_memory: must be a whole number, not 2047.9"),
    ("machines:\n  vm1:\n    driver: libvirt\n    libvirt_cpus: true\n", 4,
     "libvirt_cpus: must be a whole number, not True"),
    ("machines:\n  g1:\n    driver: generic\n    generic_ssh_port: 22.9\n", 4,
     "generic_ssh_port: must be a whole number, not 22.9"),
    ("machines:\n  g1:\n    driver: generic\n    generic_ssh_user: off\n", 4,
     "g1: generic_ssh_user: must be a string, not False"),
    ("machines:\n  web1:\n    local_engine_layer: 'no'\n", 3, "local_engine_layer: must be true or false, not 'no'"),
    ("machines:\n  e1:\n    driver: ec2\n    ec2_tags: [a=b, 1]\n", 4, "e1: ec2_tags: must be a string, not 1"),
    ("machines:\n  web1:\n    engine_mtu: big\n", 3, "engine_mtu: must be a whole number, not 'big'"),
    ("machines:\n  web1:\n    engine_icc: 'no'\n", 3, "engine_icc: must be true or false"),
    ("machines:\n  web1:\n    engine_bip: 10.1.0.0/24\n", 3, "engine_bip: 10.1.0.0/24 is a network address"),
    ("machines:\n  web1:\n    engine: docker\n\n    engine_storage_device: /dev/vdb\n", 5,
     "engine_storage_device needs engine_storage_driver btrfs"),
    ("defaults:\n  engine_opt: {hosts: x}\nmachines:\n  web1:\n", 2, "web1: engine_opt hosts: pymachine sets it"),
    ("machines:\n  web1:\n    engine_storage_driver: btrfs\n", 1 + 1,
     "local_isolation userns cannot mount loop devices"),
    ("machines:\n  web1:\n    vars: {engine_install: distro}\n", 3, "variable 'engine_install' is pymachine's own"),
    # The registry role's variables, and an engine setting recorded only when given, are pymachine's too.
    *((f"machines:\n  web1:\n    vars: {{{name}: x}}\n", 3, f"variable {name!r} is pymachine's own")
      for name in ("registry_port", "registry_trusted", "registry_tls_cert", "registry_tls_key",
                   "engine_official_url")),
    ("machines:\n  web1:\n    vars: {not a name: 1}\n", 3, "'not a name' is not a variable name"),
    ("machines:\n  web1:\n    roles: [kernel]\n", 3, "role 'kernel' runs on every machine already"),
    ("machines:\n  web1:\n    roles: [nonexistent]\n", 3, "role 'nonexistent' not found"),
    ("machines:\n  web1:\n    swarm: leader\n", 3, "swarm must be manager or worker"),
    ("machines:\n  web1:\n    swarm: worker\n", 2, "web1: swarm: worker needs a machine with swarm: manager"),
    ("machine:\n  web1:\n", 1, "unknown key 'machine' (use name, defaults, machines)"),
    ("name: shop\n", 1, "machines must be a mapping"),
    ("- web1\n", 1, "a fleet file is a mapping"),
    ("machines:\n  web1: [a\n", 3, "YAML syntax error"),
    ("defaults:\n  count: 2\nmachines:\n  web1:\n", 2, "count belongs to a machine"),
    # YAML reads these keys as a number, a boolean, null: a machine is never renamed silently (010 is 8).
    *((f"machines:\n  web1:\n  {key}:\n", 3, "machine names must be strings (quote it)") for key in ("010", "on", "~")),
    ("machines:\n  web:\n    count: 100000000\n", 3, "web: count must be at most 1000, not 100000000"),
    # An alias inside the node it names has no value: it is refused, not walked forever.
    ("name: &x [*x]\nmachines:\n  web1:\n", 1, "an alias inside the node it names"),
    ("machines:\n  web1:\n    vars: &x {a: [1, {b: *x}]}\n", 3, "an alias inside the node it names"),
    # Ten aliases of ten aliases of …: 10^30 values once expanded (everything reading them would never end).
    pytest.param("machines:\n  web1:\n    vars:\n      a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
                 + "".join(f"      a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 30)), 8,
                 "its aliases expand to more than 100000 values", id="aliases of aliases"),
    pytest.param("a: " + "[" * 5000 + "]" * 5000 + "\nmachines: {web1: }\n", "", "nested too deeply",
                 id="nested too deeply"),
])
def test_a_bad_fleet_file_is_refused_naming_file_line_and_machine(tmp_path, text, line, message):
    path = write(tmp_path, text)
    with pytest.raises(FleetError) as error:
        fleetfile.load(path)
    assert str(error.value).startswith(f"{path}:{line}: " if line else f"{path}: "), str(error.value)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_driver_options_take_yaml_values_of_their_type(tmp_path):
    fleet = fleetfile.load(write(tmp_path, """\
        machines:
          vm1: {driver: libvirt, libvirt_memory: 4096, libvirt_engine_layer: false}
          e1: {driver: ec2, ec2_security_group: [a, b]}
          g1: {driver: generic, generic_ip_address: 10.0.0.5, generic_ssh_port: 2222}
    """))
    vm1, e1, g1 = (spec.options for spec in fleet.machines)
    assert (vm1["libvirt_memory"], vm1["libvirt_engine_layer"]) == (4096, False)
    assert (e1["ec2_security_group"], g1["generic_ssh_port"]) == (["a", "b"], 2222)


def test_empty_vars_roles_and_driver_are_as_if_not_given(tmp_path):
    fleet = fleetfile.load(write(tmp_path, """\
        defaults:
          vars: {region: north}
          roles:
        machines:
          web1:
            vars:
            roles:
            driver:
          web2: {vars: {tier: web}}
    """))
    web1, web2 = fleet.machines
    assert (web1.vars, web1.roles, web1.driver) == ({"region": "north"}, (), "local")
    assert web2.vars == {"region": "north", "tier": "web"}
    fleet = fleetfile.load(write(tmp_path, "machines:\n  web1:\n    vars:\n    roles:\n"))
    assert (fleet.machines[0].vars, fleet.machines[0].roles) == ({}, ())


def test_shared_aliases_are_read_once_each(tmp_path):
    fleet = fleetfile.load(write(tmp_path, """\
        defaults: &all {vars: &v {ports: [80, 443]}, engine_install: distro}
        machines:
          web1: *all
          web2: {vars: *v}
    """))
    assert [m.vars for m in fleet.machines] == [{"ports": [80, 443]}] * 2


def test_roles_beside_the_file_are_found_and_checked_before_anything_runs(tmp_path):
    def site(directory: Path, tasks: str) -> Path:
        (directory / "roles/site/tasks").mkdir(parents=True)
        (directory / "roles/site/tasks/main.yml").write_text(tasks)
        return write(directory, "machines:\n  web1:\n    roles: [site]\n")

    fleet = fleetfile.load(site(tmp_path / "good", "- name: hello\n  debug: {msg: hi}\n"))
    assert fleet.machines[0].roles == ("site",) and fleet.roles_path[0] == tmp_path / "good/roles"
    with pytest.raises(FleetError, match=r"fleet.yaml:3: web1: roles/site/tasks/main.yml:2: unknown module"):
        fleetfile.load(site(tmp_path / "bad", "- name: hello\n  no_such_module: {}\n"))


def test_the_cli_refuses_a_bad_file_in_one_line_and_makes_nothing(cli, tmp_path):
    path = write(tmp_path, "machines:\n  web1: {}\n  web2:\n    engine_bipp: x\n")
    proc = cli("apply", str(path), check=False)
    assert proc.returncode == 2
    assert proc.stderr == f"pymachine: error: {path}:4: web2: unknown engine option 'engine_bipp'\n"
    assert not (cli.home / "machines").exists()


# -- the plan, against records in a real store (no machine runs: only what needs no SSH) ------------------
def record(store: Store, spec: fleetfile.MachineSpec, fleet: str | None, **changes) -> None:
    """A machine's record as create (and, with `fleet`, apply) writes it, with `changes` to its fields."""
    cls_options = {**spec.options, **changes.pop("options", {})}
    with store.reserve(spec.name, spec.driver, cls_options, {**spec.engine, **changes.pop("engine", {})}) as m:
        m.state = "ready"
        m.fleet = spec.marker(fleet) if fleet else {}
        m.save()


def steps(the_plan: apply.Plan) -> dict[str, tuple[str, str]]:
    return {s.name: (s.action, s.reason) for s in the_plan.steps}


def test_the_plan_touches_only_machines_this_file_made(tmp_path):
    store = Store(tmp_path / "home")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  web: {count: 3}\n"))
    web1, web2, web3 = fleet.machines
    record(store, web1, None)  # made by hand with the same name
    record(store, web2, "other")
    record(store, web3, "shop", engine={"engine_install": "distro"})
    result = steps(apply.plan(store, fleet))
    assert result["web1"] == (apply.REFUSED, "exists and was made by `pymachine create`, not by this file")
    assert result["web2"] == (apply.REFUSED, "exists and was made by fleet 'other', not by this file")
    assert result["web3"] == (apply.REPROVISION, "engine_install 'distro' → 'official'")


def test_a_machine_a_killed_create_or_rm_left_is_refused_saying_so(tmp_path):
    store = Store(tmp_path / "home")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  web: {count: 2}\n"))
    for spec, state in zip(fleet.machines, ("creating", "removing"), strict=True):
        record(store, spec, "shop")
        with store.locked(spec.name) as machine:
            machine.state = state
            machine.save()
    result = steps(apply.plan(store, fleet))
    assert result["web1"] == (apply.REFUSED, "its create was interrupted: `pymachine rm -f web1` removes what it made")
    assert result["web2"] == (apply.REFUSED, "its removal was interrupted: `pymachine rm -f web2` finishes it")


def test_a_changed_driver_option_needs_recreate(tmp_path):
    store = Store(tmp_path / "home")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  web1: {local_isolation: privileged}\n"))
    record(store, fleet.machines[0], "shop", options={"local_isolation": "userns"})
    action, reason = steps(apply.plan(store, fleet))["web1"]
    assert action == apply.REFUSED and "local_isolation 'userns' → 'privileged'" in reason and "--recreate" in reason
    assert steps(apply.plan(store, fleet, recreate=True))["web1"][0] == apply.RECREATE
    before = (store.machines_dir / "web1" / "config.json").read_text()
    with pytest.raises(MachineError, match=r"fleet.yaml:3: web1: .*--recreate.*; nothing was changed"):
        apply.execute(store, apply.plan(store, fleet))
    assert (store.machines_dir / "web1" / "config.json").read_text() == before


def test_recreate_is_refused_before_the_machine_is_removed_when_create_would_refuse_it(tmp_path):
    """create's own checks of the new options run at planning: a machine is never removed to be made anew with
    options create refuses."""
    store = Store(tmp_path / "home")
    machine = "name: shop\nmachines:\n  g1:\n    driver: generic\n    generic_ip_address: 127.0.0.1\n"
    record(store, fleetfile.load(write(tmp_path, machine)).machines[0], "shop")
    fleet = fleetfile.load(write(tmp_path, machine + "    generic_ssh_port: 70000\n"))
    with pytest.raises(FleetError) as error:
        apply.plan(store, fleet, recreate=True)
    assert str(error.value) == f"{tmp_path / 'fleet.yaml'}:3: g1: generic_ssh_port: 70000 is not a port number"
    assert store.exists("g1")


def test_creates_checks_are_said_of_the_files_machine_at_its_line(tmp_path):
    fleet = fleetfile.load(write(tmp_path, "machines:\n  web1: {}\n  web2:\n    local_subnet: 10.0.0.0/33\n"))
    with pytest.raises(FleetError) as error:
        apply.plan(Store(tmp_path / "home"), fleet)
    assert str(error.value) == f"{tmp_path / 'fleet.yaml'}:3: web2: local_subnet: '33' is not a valid netmask"


def test_a_failed_provisioning_is_done_again_by_the_next_apply(tmp_path, monkeypatch):
    """Re-provisioned for changed vars, or made anew: the run fails. The record has the file's settings, and the
    check-mode run may say nothing would change (a `command:` task is skipped in check mode): the record says
    its provisioning did not succeed, until it does."""
    store = Store(tmp_path / "home")
    record(store, fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  web1: {vars: {port: 80}}\n")).machines[0],
           "shop")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  web1: {vars: {port: 8080}}\n  web2: {}\n"))
    specs = {spec.name: spec for spec in fleet.machines}
    monkeypatch.setattr(LocalDriver, "pre_create_check", classmethod(lambda cls, options: None))
    monkeypatch.setattr(LocalDriver, "state", lambda self: State.RUNNING)
    monkeypatch.setattr(apply, "start", lambda store, name: None)
    monkeypatch.setattr(apply, "create", lambda store, name, *_, **__: record(store, specs[name], None))
    failing = [True]

    def run_provisioning(store: Store, machine: Machine, driver: Driver, *, check: bool = False, **_) -> Any:
        if failing[0] and not check:
            raise MachineError(f"provisioning {machine.name} failed: 'reconfigure --port 8080' returned 1")
        return SimpleNamespace(changed=0)

    monkeypatch.setattr(apply, "run_provisioning", run_provisioning)
    outcomes = apply.execute(store, apply.plan(store, fleet))
    assert [(o.step.action, o.step.name, o.error is not None) for o in outcomes] == [
        (apply.REPROVISION, "web1", True), (apply.CREATE, "web2", True)]
    again = (apply.REPROVISION, "its last provisioning did not succeed")
    assert steps(apply.plan(store, fleet)) == {"web1": again, "web2": again}
    failing[0] = False
    apply.execute(store, apply.plan(store, fleet))
    assert steps(apply.plan(store, fleet)) == {"web1": (apply.UNCHANGED, ""), "web2": (apply.UNCHANGED, "")}
    assert store.load("web1").fleet == {"name": "shop", "roles": [], "vars": {"port": 8080}}


def test_prune_removes_only_the_fleets_machines_that_the_file_no_longer_names(tmp_path):
    store = Store(tmp_path / "home")
    old = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  web: {count: 3}\n"))
    for spec in old.machines[:2]:
        record(store, spec, "shop", engine={"engine_install": "distro"})
    record(store, old.machines[2], None)  # web3, made by hand
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  web: {count: 1}\n"))
    assert steps(apply.plan(store, fleet))["web2"] == (apply.KEEP, "no longer in the file; --prune removes it")
    pruned = steps(apply.plan(store, fleet, prune=True))
    assert pruned["web2"] == (apply.REMOVE, "") and "web3" not in pruned


def test_vars_with_keys_json_keeps_as_strings_are_unchanged_once_recorded(tmp_path):
    """config.json turns {80: 8080} into {"80": 8080}: what the file says is compared as recorded."""
    store = Store(tmp_path / "home")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  web1: {vars: {ports: {80: 8080}, at: {1.5: x}}}"))
    record(store, fleet.machines[0], "shop")
    assert store.load("web1").fleet["vars"] == {"ports": {"80": 8080}, "at": {"1.5": "x"}}
    # Not running (a record only): re-provisioned for that alone, not for changed vars.
    assert steps(apply.plan(store, fleet))["web1"] == (apply.REPROVISION, "not running: started and provisioned")


def test_dry_run_shows_the_plan_and_changes_nothing(cli, tmp_path):
    store = Store(cli.home)
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  web1: {engine_install: distro}\n"))
    record(store, fleet.machines[0], "shop", engine={"engine_install": "official"})
    config = cli.home / "machines" / "web1" / "config.json"
    before = config.read_text()
    proc = cli("apply", "--dry-run", str(tmp_path / "fleet.yaml"))
    assert proc.stdout.split() == ["re-provision", "web1", "(engine_install", "'official'", "→", "'distro')"]
    assert config.read_text() == before and json.loads(before)["engine"]["engine_install"] == "official"


def test_a_refused_plan_fails_even_as_a_dry_run(cli, tmp_path):
    store = Store(cli.home)
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  web1: {}\n"))
    record(store, fleet.machines[0], None)  # made by hand
    proc = cli("apply", "--dry-run", str(tmp_path / "fleet.yaml"), check=False)
    assert proc.returncode == 1 and proc.stdout.split()[:2] == ["refused", "web1"]
    assert proc.stderr == (f"pymachine: error: {tmp_path / 'fleet.yaml'}:3: web1: exists and was made by "
                           f"`pymachine create`, not by this file; nothing was changed\n")


def test_swarm_roles_changed_in_the_file_are_promoted_before_demoted(tmp_path, monkeypatch):
    """web1 manages the swarm (as the records say); the file makes web2 its manager instead: web2 is promoted
    before web1 is demoted, a newcomer joins through web1 (the manager there is), a machine without `swarm:`
    leaves. The engines' answers are stubbed: the integration test (test_apply) does it with real ones."""
    store = Store(tmp_path / "home")
    fleet = fleetfile.load(write(tmp_path, """\
        name: shop
        machines:
          web1: {swarm: worker}
          web2: {swarm: manager}
          web3: {swarm: worker}
          web4: {}
    """))
    for spec in fleet.machines:
        record(store, spec, "shop")
    with store.locked("web1") as machine:
        machine.fleet = {**machine.fleet, "swarm": "manager"}
        machine.save()
    nodes = [("web1", "manager"), ("web2", "worker"), ("web4", "worker")]

    def ls(store: Store, manager: str) -> list[dict[str, str]]:
        if manager != "web1":
            raise MachineError(f"{manager} is a worker of its swarm, not a manager: name one of its managers")
        return [{"machine": name, "role": role} for name, role in nodes]

    monkeypatch.setattr(apply.swarm, "ls", ls)
    swarm_steps = [s for s in apply.plan(store, fleet).steps if s.action not in (apply.REPROVISION, apply.UNCHANGED)]
    assert [(s.action, s.name, s.reason, s.via) for s in swarm_steps] == [
        (apply.PROMOTE, "web2", "worker → manager", ""), (apply.JOIN_WORKER, "web3", "", "web1"),
        (apply.DEMOTE, "web1", "manager → worker", ""), (apply.LEAVE, "web4", "", "")]
