"""apply's swarm steps: planned against records in a real store, with the engines' answers (`swarm ls`) stubbed,
and carried out with the machines' and the swarm's actions stubbed: what is checked is which steps run, in which
order, and which are skipped (tests/integration/test_apply.py does it with real machines)."""

from __future__ import annotations

import pytest

from machine import fleetfile
from machine.commands import apply, swarm
from machine.commands.queries import NotRunning
from machine.errors import MachineError
from machine.store import Store
from tests.unit.test_fleetfile import record, write

SWARM_AND_GONE = (*apply._SWARM_ORDER, apply.REMOVE, apply.KEEP)


def recorded(store: Store, spec: fleetfile.MachineSpec, role: str = "", **changes) -> None:
    """A machine of the fleet `shop`, recorded in its swarm as `role`."""
    record(store, spec, "shop", **changes)
    with store.locked(spec.name) as machine:
        machine.fleet = {**machine.fleet, "swarm": role}
        machine.save()


def swarm_of(monkeypatch: pytest.MonkeyPatch, manager: str, nodes: dict[str, str],
             refusal: type[MachineError] = swarm.NotInSwarm) -> None:
    """`swarm ls` answers {machine: role} through `manager`; every other machine answers `refusal`."""
    def ls(store: Store, name: str) -> list[dict[str, str]]:
        if name != manager:
            raise refusal(f"{name} answers {refusal.__name__}")
        return [{"machine": machine, "role": role} for machine, role in nodes.items()]

    monkeypatch.setattr(apply.swarm, "ls", ls)


def swarm_steps(the_plan: apply.Plan) -> list[tuple[str, str, str]]:
    """(action, machine, via) of the plan's swarm steps and removals, in the plan's order."""
    return [(s.action, s.name, s.via) for s in the_plan.steps if s.action in SWARM_AND_GONE]


def carry_out(monkeypatch: pytest.MonkeyPatch, store: Store, the_plan: apply.Plan,
              failing: tuple[str, ...] = ()) -> tuple[list[tuple[str, str]], dict[tuple[str, str], str]]:
    """Execute the plan with every action stubbed (those in `failing` fail): the (action, machine) run, in order,
    and the failure of each step that failed or was skipped."""
    ran = []

    def action(store: Store, fleet: fleetfile.Fleet, step: apply.Step) -> None:
        ran.append((step.action, step.name))
        if step.action in failing:
            raise MachineError(f"{step.action} broke")

    for actions in (apply._MACHINE_ACTIONS, apply._SWARM_ACTIONS):
        for name in actions:
            monkeypatch.setitem(actions, name, action)
    outcomes = apply.execute(store, the_plan)
    return ran, {(o.step.action, o.step.name): o.failure for o in outcomes if o.error}


def test_prune_removes_a_renamed_manager_only_after_its_successor_joined(tmp_path, monkeypatch):
    """lb (the only manager) is renamed front: front joins through lb, and only then is lb removed; its removal
    (a force-leave, the last manager then) never comes first."""
    store = Store(tmp_path / "home")
    v1 = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  lb: {swarm: manager}\n"
                                        "  web: {count: 2, swarm: worker}\n"))
    lb, web1, web2 = v1.machines
    recorded(store, lb, "manager")
    recorded(store, web1, "worker")
    recorded(store, web2, "worker")
    swarm_of(monkeypatch, "lb", {"lb": "manager", "web1": "worker", "web2": "worker"})
    v2 = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  front: {swarm: manager}\n"
                                        "  web: {count: 2, swarm: worker}\n"))
    the_plan = apply.plan(store, v2, prune=True)
    assert swarm_steps(the_plan) == [(apply.JOIN_MANAGER, "front", "lb"), (apply.REMOVE, "lb", "")]
    ran, failures = carry_out(monkeypatch, store, the_plan)
    assert ran.index((apply.JOIN_MANAGER, "front")) < ran.index((apply.REMOVE, "lb")) == len(ran) - 1
    assert failures == {}
    # front's join failed: lb is kept, the swarm's manager (the next apply joins front and removes lb).
    ran, failures = carry_out(monkeypatch, store, the_plan, failing=(apply.JOIN_MANAGER,))
    assert (apply.REMOVE, "lb") not in ran
    assert failures[(apply.REMOVE, "lb")] == "skipped: join as manager front failed"


def test_prune_removes_a_machine_in_no_swarm_before_anything_is_made(tmp_path, monkeypatch):
    """Its name, address and share of the host are free for the machines made next: all of it is removed before
    any create starts, a swarm's node still only after the swarm steps."""
    store = Store(tmp_path / "home")
    v1 = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  lb: {swarm: manager}\n  app: {count: 2}\n"))
    lb, app1, app2 = v1.machines
    recorded(store, lb, "manager")
    recorded(store, app1)
    recorded(store, app2)
    swarm_of(monkeypatch, "lb", {"lb": "manager"})
    v2 = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  front: {swarm: manager}\n  web: {count: 2}\n"))
    the_plan = apply.plan(store, v2, prune=True)
    assert [(s.action, s.name) for s in the_plan.steps] == [
        (apply.REMOVE, "app1"), (apply.REMOVE, "app2"), (apply.CREATE, "front"), (apply.CREATE, "web1"),
        (apply.CREATE, "web2"), (apply.JOIN_MANAGER, "front"), (apply.REMOVE, "lb")]
    ran, failures = carry_out(monkeypatch, store, the_plan)
    assert sorted(ran[:2]) == [(apply.REMOVE, "app1"), (apply.REMOVE, "app2")] and failures == {}
    assert ran[2:] == [step for step in ran if step[0] == apply.CREATE] + [(apply.JOIN_MANAGER, "front"),
                                                                            (apply.REMOVE, "lb")]


def test_a_join_goes_through_a_manager_that_stays(tmp_path, monkeypatch):
    """alpha and web1 both manage the swarm; alpha is pruned, web1 demoted: front joins through web1."""
    store = Store(tmp_path / "home")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  front: {swarm: manager}\n"
                                           "  web1: {swarm: worker}\n"))
    alpha = fleetfile.load(write(tmp_path, "machines:\n  alpha: {}\n", "old.yaml")).machines[0]
    recorded(store, alpha, "manager")
    recorded(store, fleet.machines[1], "manager")
    managers = {"alpha": "manager", "web1": "manager"}
    monkeypatch.setattr(apply.swarm, "ls", lambda store, name: [{"machine": m, "role": r} for m, r in managers.items()])
    assert swarm_steps(apply.plan(store, fleet, prune=True)) == [
        (apply.JOIN_MANAGER, "front", "web1"), (apply.DEMOTE, "web1", ""), (apply.REMOVE, "alpha", "")]


def test_a_recreated_worker_joins_again(tmp_path, monkeypatch):
    """Its old node is still listed by the manager: the new machine is in no swarm yet, and joins."""
    store = Store(tmp_path / "home")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  lb: {swarm: manager}\n"
                                           "  web1: {swarm: worker, local_isolation: privileged}\n"))
    lb, web1 = fleet.machines
    recorded(store, lb, "manager")
    recorded(store, web1, "worker", options={"local_isolation": "userns"})
    swarm_of(monkeypatch, "lb", {"lb": "manager", "web1": "worker"})
    the_plan = apply.plan(store, fleet, recreate=True)
    assert [(s.action, s.name) for s in the_plan.steps][:2] == [(apply.REPROVISION, "lb"), (apply.RECREATE, "web1")]
    assert swarm_steps(the_plan) == [(apply.JOIN_WORKER, "web1", "lb")]


def test_a_recreated_only_manager_makes_a_new_swarm_its_workers_leave_the_old_one_for(tmp_path, monkeypatch):
    """Re-created, the swarm's only manager takes its swarm along: the workers, still in it, leave it first, then
    join the new one. When a recorded manager does not answer, nothing is left on a guess."""
    store = Store(tmp_path / "home")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  lb: {swarm: manager, local_isolation: "
                                           "privileged}\n  web: {count: 2, swarm: worker}\n  db1: {}\n"))
    lb, web1, web2, db1 = fleet.machines
    recorded(store, lb, "manager", options={"local_isolation": "userns"})
    recorded(store, web1, "worker")
    recorded(store, web2, "worker")
    recorded(store, db1)
    swarm_of(monkeypatch, "lb", {"lb": "manager", "web1": "worker", "web2": "worker"})
    the_plan = apply.plan(store, fleet, recreate=True)
    assert swarm_steps(the_plan) == [
        (apply.LEAVE_OLD, "web1", ""), (apply.LEAVE_OLD, "web2", ""), (apply.INIT, "lb", ""),
        (apply.JOIN_WORKER, "web1", "lb"), (apply.JOIN_WORKER, "web2", "lb")]
    ran, _ = carry_out(monkeypatch, store, the_plan)
    assert ran.index((apply.RECREATE, "lb")) < ran.index((apply.LEAVE_OLD, "web1"))
    # lb's re-creation failed: its old swarm may live on, and is not left.
    _, failures = carry_out(monkeypatch, store, the_plan, failing=(apply.RECREATE,))
    assert failures[(apply.LEAVE_OLD, "web1")] == "skipped: recreate lb failed"

    same = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  lb: {swarm: manager, local_isolation: userns}\n"
                                          "  web: {count: 2, swarm: worker}\n  db1: {}\n"))
    swarm_of(monkeypatch, "nobody", {}, refusal=MachineError)  # lb's engine does not answer
    assert swarm_steps(apply.plan(store, same)) == [
        (apply.INIT, "lb", ""), (apply.JOIN_WORKER, "web1", "lb"), (apply.JOIN_WORKER, "web2", "lb")]


def test_a_failed_promotion_keeps_every_manager_and_node(tmp_path, monkeypatch):
    """web2 is to replace web1 as the manager: its promotion fails, so web1 is not demoted, and no node leaves or is
    removed (web1 would have been the last manager). A newcomer still joins; a pruned machine in no swarm goes,
    first."""
    store = Store(tmp_path / "home")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  web1: {swarm: worker}\n"
                                           "  web2: {swarm: manager}\n  web3: {swarm: worker}\n  web4: {}\n"))
    web1, web2, _, web4 = fleet.machines
    old = fleetfile.load(write(tmp_path, "machines:\n  old: {count: 2}\n", "old.yaml")).machines
    for spec, role in ((web1, "manager"), (web2, "worker"), (web4, "worker"), (old[0], "worker"), (old[1], "")):
        recorded(store, spec, role)
    swarm_of(monkeypatch, "web1", {"web1": "manager", "web2": "worker", "web4": "worker", "old1": "worker"})
    the_plan = apply.plan(store, fleet, prune=True)
    assert swarm_steps(the_plan) == [
        (apply.REMOVE, "old2", ""), (apply.PROMOTE, "web2", ""), (apply.JOIN_WORKER, "web3", "web1"),
        (apply.DEMOTE, "web1", ""), (apply.LEAVE, "web4", ""), (apply.REMOVE, "old1", "")]
    ran, failures = carry_out(monkeypatch, store, the_plan, failing=(apply.PROMOTE,))
    assert [step for step in ran if step[0] in SWARM_AND_GONE] == [
        (apply.REMOVE, "old2"), (apply.PROMOTE, "web2"), (apply.JOIN_WORKER, "web3")]
    assert failures == {(apply.PROMOTE, "web2"): "promote broke",
                        **{step: "skipped: promote web2 failed" for step in (
                            (apply.DEMOTE, "web1"), (apply.LEAVE, "web4"), (apply.REMOVE, "old1"))}}


def test_a_stopped_manager_is_taken_at_its_record(tmp_path, monkeypatch):
    """A stopped fleet: the manager's engine cannot say what it manages; its record says it manages the fleet's
    swarm, as the workers' records say they are in it. No `swarm init` (it would fail: already in a swarm)."""
    store = Store(tmp_path / "home")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  lb: {swarm: manager}\n"
                                           "  web: {count: 3, swarm: worker}\n"))
    lb, web1, web2, _ = fleet.machines
    recorded(store, lb, "manager")
    recorded(store, web1, "worker")
    recorded(store, web2, "manager")  # to be demoted
    swarm_of(monkeypatch, "nobody", {}, refusal=NotRunning)
    assert swarm_steps(apply.plan(store, fleet)) == [(apply.JOIN_WORKER, "web3", "lb"), (apply.DEMOTE, "web2", "")]


def test_a_stopped_manager_the_file_no_longer_names_is_never_joined_through(tmp_path, monkeypatch):
    """apply starts only the file's machines: a stopped manager it keeps (no --prune) would stay stopped, and
    every join through it would fail."""
    store = Store(tmp_path / "home")
    before = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  old: {swarm: manager}\n  lb: {}\n"
                                            "  web1: {swarm: worker}\n"))
    old, lb, web1 = before.machines
    recorded(store, old, "manager")
    recorded(store, lb)
    recorded(store, web1, "worker")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  lb: {swarm: manager}\n  web1: {swarm: worker}\n"))
    swarm_of(monkeypatch, "nobody", {}, refusal=NotRunning)
    steps = swarm_steps(apply.plan(store, fleet))
    assert (apply.INIT, "lb", "") in steps and all(via != "old" for _, _, via in steps)


def test_a_machine_that_left_its_swarm_by_hand_is_done_leaving(tmp_path, monkeypatch):
    """`pymachine swarm leave web1`, then `swarm:` taken from web1 in the file: the record still says worker, so a
    leave is planned; the engine says web1 is in no swarm: that is what the file wants, and the record follows."""
    store = Store(tmp_path / "home")
    fleet = fleetfile.load(write(tmp_path, "name: shop\nmachines:\n  lb: {swarm: manager}\n  web1: {}\n"))
    recorded(store, fleet.machines[0], "manager")
    recorded(store, fleet.machines[1], "worker")
    swarm_of(monkeypatch, "lb", {"lb": "manager"})
    the_plan = apply.plan(store, fleet)
    assert swarm_steps(the_plan) == [(apply.LEAVE, "web1", "")]

    def leave(store: Store, name: str, force: bool = False) -> None:
        raise swarm.NotInSwarm(f"{name} is not in a swarm")

    monkeypatch.setattr(apply.swarm, "leave", leave)
    monkeypatch.setitem(apply._MACHINE_ACTIONS, apply.REPROVISION, lambda *_: None)
    outcomes = apply.execute(store, the_plan)
    assert [(o.step.action, o.failure, o.detail) for o in outcomes if o.step.action == apply.LEAVE] == [
        (apply.LEAVE, None, "it was in no swarm")]
    assert store.load("web1").fleet["swarm"] == ""
    assert swarm_steps(apply.plan(store, fleet)) == []
