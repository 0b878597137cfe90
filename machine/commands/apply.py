"""`pymachine apply FLEET.yaml`: make the machines a fleet file names, and keep them as it says.

plan() compares the file with the store (and, for a machine whose recorded settings match, with a check-mode
provisioning run) and changes nothing; execute() carries the plan out, each machine on its own: one failure is
reported and does not stop the others. A machine apply makes carries its fleet's name in its record (`fleet`),
and only such machines are ever re-provisioned, re-created or removed by apply.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from machine import drivers, fleetfile, ui
from machine import provision as provisioning
from machine.commands import swarm
from machine.commands.common import load, locked
from machine.commands.engine import run_provisioning, share_registries
from machine.commands.machines import create, rm, start
from machine.commands.queries import NotRunning, unfinished
from machine.drivers.base import Driver, State
from machine.errors import MachineError, UsageError
from machine.fleet import run as run_parallel
from machine.fleetfile import Fleet, FleetError, MachineSpec
from machine.store import Machine, Store

CREATE, REPROVISION, RECREATE, UNCHANGED, REMOVE, KEEP, REFUSED = (
    "create", "re-provision", "recreate", "unchanged", "remove", "keep", "refused")
# Swarm steps, after every machine is made or provisioned, in this order: the swarm keeps a manager throughout
# (workers are promoted, and new managers join, before managers are demoted or leave; the nodes the file no
# longer names are removed last). A swarm made anew is left first by the machines still in the old one.
LEAVE_OLD, INIT, PROMOTE, JOIN_MANAGER, JOIN_WORKER, DEMOTE, LEAVE = (
    "leave old swarm", "swarm init", "promote", "join as manager", "join as worker", "demote", "leave the swarm")
_SWARM_ORDER = (LEAVE_OLD, INIT, PROMOTE, JOIN_MANAGER, JOIN_WORKER, DEMOTE, LEAVE)
# What must not have failed for a step to run: the swarm is made before anything joins it, and has its new
# managers before any of its nodes is taken out of it (REMOVE: a machine recorded in a swarm); an old swarm is
# surely without managers only once the re-creations are done.
_GIVES_MANAGERS = (INIT, PROMOTE, JOIN_MANAGER)
_NEEDS = {LEAVE_OLD: (RECREATE,), PROMOTE: (INIT,), JOIN_MANAGER: (INIT,), JOIN_WORKER: (INIT,),
          DEMOTE: _GIVES_MANAGERS, LEAVE: _GIVES_MANAGERS, REMOVE: _GIVES_MANAGERS}
# How a summary counts what was done.
DONE = {CREATE: "created", REPROVISION: "re-provisioned", RECREATE: "re-created", REMOVE: "removed",
        LEAVE_OLD: "left an old swarm", INIT: "made a swarm", JOIN_MANAGER: "joined as manager",
        JOIN_WORKER: "joined as worker", PROMOTE: "promoted", DEMOTE: "demoted", LEAVE: "left the swarm"}

# In a machine's fleet marker from before apply provisions it until that run succeeds: a failed (or interrupted) run
# is done again by the next apply, whatever its check-mode run says (a `command:` task is skipped in check mode).
UNPROVISIONED = "unprovisioned"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Step:
    action: str
    name: str
    reason: str = ""
    spec: MachineSpec | None = None
    via: str = ""  # a join: the manager of the swarm it joins through


@dataclass(frozen=True)
class Plan:
    fleet: Fleet
    steps: tuple[Step, ...]

    @property
    def refused(self) -> list[Step]:
        return [s for s in self.steps if s.action == REFUSED]

    @property
    def changes(self) -> list[Step]:
        return [s for s in self.steps if s.action not in (UNCHANGED, KEEP)]


@dataclass(frozen=True)
class Outcome:
    step: Step
    error: Exception | None = None
    detail: str = ""  # e.g. "5 tasks changed"

    @property
    def failure(self) -> str | None:
        if self.error is None:
            return None
        return str(self.error) if isinstance(self.error, MachineError) else f"internal error: {self.error!r}"


def for_each(fn: Callable[[T], R], items: Sequence[T], done: str, parallel: int | None = None,
             failure: Callable[[R], str | None] = lambda _: None) -> list[R]:
    """fn(item) for every item (each has a `name`), a bounded number at once (machine.fleet.run), each machine's
    progress on a line of its own (ui.board); `failure` tells the line how a result ended. `fn` reports its own
    failures in what it returns: anything it raises (Ctrl-C, an internal error) is raised here."""
    by_name = {item.name: item for item in items}  # type: ignore[attr-defined]
    results: dict[str, R] = {}
    board = ui.board(list(by_name), done)

    def one(name: str) -> None:
        if board is None:
            results[name] = fn(by_name[name])
            return
        with ui.showing(board.line(name)):
            results[name] = fn(by_name[name])
        board.finish(name, failure(results[name]))

    with board or contextlib.nullcontext():
        outcomes = run_parallel(list(by_name), one, parallel)
    for outcome in outcomes:
        if outcome.error is not None:
            raise outcome.error
    return [results[name] for name in by_name]


# -- the plan ------------------------------------------------------------------------------------------------
def plan(store: Store, fleet: Fleet, *, prune: bool = False, recreate: bool = False,
         parallel: int | None = None) -> Plan:
    """What apply would do; changes nothing (existing machines get a check-mode provisioning run)."""
    provisioning.check_roles()
    steps = for_each(lambda spec: _plan_machine(store, fleet, spec, recreate), fleet.machines, "checked",
                     parallel)
    for step in steps:  # before a machine is made or removed
        if step.action in (CREATE, RECREATE) and step.spec:
            _check_create(step.spec)
    named = {s.name for s in fleet.machines}
    ours = _fleet_markers(store, fleet.name)
    gone = [Step(REMOVE, name) if prune else Step(KEEP, name, "no longer in the file; --prune removes it")
            for name in ours if name not in named]
    new = {s.name for s in steps if s.action in (CREATE, RECREATE)}
    roles = {name: marker["swarm"] for name, marker in ours.items() if marker.get("swarm")}
    swarm_steps = _plan_swarm(store, fleet, new, {s.name for s in gone if s.action == REMOVE}, roles)
    # A machine in no swarm is removed first: the machines made next get its address, UID range and share of the
    # host (a fleet renamed on a full subnet could not be made otherwise). A swarm's node goes last, once the
    # swarm has its new managers.
    first = [s for s in gone if s.action == REMOVE and s.name not in roles]
    last = [s for s in gone if s not in first]
    return Plan(fleet, (*first, *steps, *swarm_steps, *last))  # in the order execute() carries them out


def _check_create(spec: MachineSpec) -> None:
    """create's checks of the machine's options and of the host (root, tools). Their messages name create's flags:
    said of the file's machine, at its line, with the file's keys, as a bad file is."""
    try:
        drivers.get(spec.driver).pre_create_check(spec.options)
    except MachineError as e:
        kind = FleetError if isinstance(e, UsageError) else MachineError
        raise kind(f"{spec.where}: {spec.name}: {fleetfile.as_keys(str(e))}") from None


def _fleet_markers(store: Store, fleet: str) -> dict[str, dict[str, Any]]:
    """{machine: the fleet marker of its record} of the fleet's machines, from one read of the store. A damaged
    record says nothing of its fleet: never pruned, nor taken for a swarm node, on a guess."""
    markers = {}
    for name in store.names():
        try:
            marker = store.load(name).fleet
        except MachineError:
            continue
        if marker.get("name") == fleet:
            markers[name] = marker
    return markers


def _plan_machine(store: Store, fleet: Fleet, spec: MachineSpec, recreate: bool) -> Step:
    if not store.exists(spec.name):
        return Step(CREATE, spec.name, spec=spec)
    try:
        machine, driver = load(store, spec.name)
    except MachineError as e:
        return Step(REFUSED, spec.name, str(e), spec)
    why = unfinished(store, machine)
    if why:
        return Step(REFUSED, spec.name, why, spec)
    if machine.fleet.get("name") != fleet.name:
        owner = f"fleet {machine.fleet['name']!r}" if machine.fleet else "`pymachine create`"
        return Step(REFUSED, spec.name, f"exists and was made by {owner}, not by this file", spec)
    if machine.state == "error":
        return Step(REFUSED, spec.name, f"its last removal failed (`pymachine rm -f {spec.name}`)", spec)
    moved = _driver_changes(machine, spec)
    if moved:
        why = f"{', '.join(moved)} changed: needs a new machine"
        return Step(RECREATE, spec.name, why, spec) if recreate else Step(
            REFUSED, spec.name, f"{why} (--recreate removes and re-creates it)", spec)
    changed = _setting_changes(machine, fleet, spec)
    if changed:
        return Step(REPROVISION, spec.name, "; ".join(changed), spec)
    if machine.fleet.get(UNPROVISIONED):
        return Step(REPROVISION, spec.name, "its last provisioning did not succeed", spec)
    if driver.state() != State.RUNNING:  # no check-mode run without SSH: started, then provisioned for real
        return Step(REPROVISION, spec.name, "not running: started and provisioned", spec)
    try:
        with locked(store, spec.name) as (machine, driver):
            tasks = _provision(store, machine, driver, fleet, spec, check=True)
    except MachineError as e:
        return Step(REPROVISION, spec.name, f"check failed: {e}", spec)
    if tasks:
        return Step(REPROVISION, spec.name, f"drifted: {tasks} task{'s' * (tasks != 1)} would change", spec)
    return Step(UNCHANGED, spec.name, spec=spec)


def _driver_changes(machine: Machine, spec: MachineSpec) -> list[str]:
    """Driver options (or the driver) whose recorded value differs from the file's: no driver changes a host."""
    if machine.driver != spec.driver:
        return [f"driver {machine.driver} → {spec.driver}"]
    cls = drivers.get(spec.driver)
    wanted, _ = cls.split_secrets(spec.options)
    recorded = {o.key: o.default for o in cls.options if not o.secret} | machine.options
    return [f"{key} {recorded.get(key)!r} → {value!r}" for key, value in wanted.items() if recorded.get(key) != value]


def _setting_changes(machine: Machine, fleet: Fleet, spec: MachineSpec) -> list[str]:
    """Engine settings, extra roles or variables that differ from the record: re-provisioned."""
    keys = sorted(set(machine.engine) | set(spec.engine))
    changes = [f"{k} {machine.engine.get(k)!r} → {spec.engine.get(k)!r}" for k in keys
               if machine.engine.get(k) != spec.engine.get(k)]
    # As config.json keeps them: a mapping's keys are strings there (`{80: 8080}` is recorded as {"80": 8080}).
    wanted = json.loads(json.dumps(spec.marker(fleet.name)))
    return changes + [f"{k} changed" for k in ("roles", "vars") if machine.fleet.get(k) != wanted[k]]


def _plan_swarm(store: Store, fleet: Fleet, new: set[str], removed: set[str], records: dict[str, str]
                ) -> list[Step]:
    """Swarm steps, in the order of _SWARM_ORDER: unless a manager of the fleet (as the file or the records say)
    manages a swarm, the file's first manager makes one; the file's other machines join it, a machine whose role
    the file changed is promoted or demoted, and a machine of the fleet the file no longer gives a swarm role
    leaves. Machines being made (or re-made) are in no swarm yet, whatever their old node was; machines being
    removed are joined through only when no other manager is left (they are removed after the joins). `records`:
    {machine: swarm role} as the records of the fleet's machines give them."""
    wanted = [s.name for s in fleet.machines if s.swarm == "manager"]
    recorded = sorted((n for n, role in records.items() if role == "manager"), key=lambda n: n in removed)
    candidates = [n for n in dict.fromkeys(wanted + recorded) if n not in new]
    via, members, orphaned = _swarm_members(store, candidates, records, {s.name for s in fleet.machines})
    members = {n: role for n, role in members.items() if n not in new}  # a machine re-made is not its old node
    steps = []
    if wanted and via is None:
        via, members = wanted[0], {wanted[0]: "manager"}
        steps.append(Step(INIT, via))
        if orphaned:  # a machine still in the old swarm (its only manager re-created, say) leaves it to join anew
            steps += [Step(LEAVE_OLD, s.name, "its swarm has no manager left") for s in fleet.machines
                      if s.swarm and s.name not in new and records.get(s.name)]
    for spec in fleet.machines:
        role = members.get(spec.name)
        if spec.swarm and role is None:
            steps.append(Step(JOIN_MANAGER if spec.swarm == "manager" else JOIN_WORKER, spec.name, via=via or ""))
        elif spec.swarm and role != spec.swarm:
            steps.append(Step(PROMOTE if spec.swarm == "manager" else DEMOTE, spec.name, f"{role} → {spec.swarm}"))
        elif not spec.swarm and spec.name not in new and (role or records.get(spec.name)):
            steps.append(Step(LEAVE, spec.name))
    return sorted(steps, key=lambda step: _SWARM_ORDER.index(step.action))


def _swarm_members(store: Store, managers: list[str], records: dict[str, str],
                   started: set[str]) -> tuple[str | None, dict[str, str], bool]:
    """The first of `managers` that manages a swarm, and {machine: role} of that swarm. Failing that, the first
    one of `started` (the file's machines: apply starts them before the swarm steps) that is stopped but recorded
    as a manager, with the roles the records give: what it manages is known once it runs again, and a stopped
    manager has not left its swarm. Else
    (None, {}, orphaned): orphaned when every one of them is surely in no swarm (or there are none), so that no
    swarm the records name has a manager of the fleet left; not when one is a worker or did not answer."""
    stopped, orphaned = None, True
    for name in managers:
        try:
            return name, {row["machine"]: row["role"] for row in swarm.ls(store, name) if row["machine"]}, False
        except NotRunning:
            if records.get(name) == "manager" and name in started:
                stopped = stopped or name
            else:  # not started by this apply: what it manages stays unknown
                orphaned = False
        except swarm.NotInSwarm:
            continue
        except MachineError:  # a worker, unreachable, or no record: `swarm init` (after provisioning) says which
            orphaned = False
    return (stopped, dict(records), False) if stopped else (None, {}, orphaned)


def _recorded_swarm(store: Store, name: str) -> str:
    try:
        return store.load(name).fleet.get("swarm", "")
    except MachineError:
        return ""


# -- carrying it out -----------------------------------------------------------------------------------------
def check(the_plan: Plan) -> None:
    """Refuse a plan with a refused step: apply changes nothing then (a --dry-run says so too)."""
    if the_plan.refused:
        step = the_plan.refused[0]
        where = step.spec.where if step.spec else the_plan.fleet.path  # the machine's line in the file
        raise MachineError(f"{where}: {step.name}: {step.reason}; nothing was changed")


def execute(store: Store, the_plan: Plan, report: Callable[[Outcome], None] = lambda _: None,
            parallel: int | None = None) -> list[Outcome]:
    """Carry out a plan without refused steps, in its order: the machines the file no longer names that are in no
    swarm are removed, machines are made and provisioned (each on its own), the swarm steps run one at a time,
    then the swarm's nodes the file no longer names are removed: a removed manager leaves its swarm only once the
    new managers are in. A step whose machine (or a step it needs, _NEEDS) failed is skipped, reported as failed
    with the reason. Every outcome is passed to `report` as it happens."""
    check(the_plan)
    fleet = the_plan.fleet
    outcomes: list[Outcome] = []

    def run(step: Step) -> Outcome:
        why = _blocked(store, step, outcomes)
        if why:
            outcome = Outcome(step, MachineError(f"skipped: {why}"))
        else:
            actions = _SWARM_ACTIONS if step.action in _SWARM_ACTIONS else _MACHINE_ACTIONS
            outcome = _guarded(step, lambda: actions[step.action](store, fleet, step))
        report(outcome)
        return outcome

    for phase in _phases(the_plan.steps):
        if phase[0].action in _SWARM_ACTIONS:
            for step in phase:  # one at a time, in order
                outcomes.append(run(step))
            continue
        done = for_each(run, phase, "done", parallel, lambda outcome: outcome.failure)  # each machine on its own
        outcomes += done
        for outcome in done:  # as create does, once all are made: sharing locks every other machine in turn
            spec = outcome.step.spec
            if not outcome.error and spec and spec.engine.get("registry_enabled"):
                share_registries(store, spec.name)
    return outcomes


def _phases(steps: Iterable[Step]) -> list[list[Step]]:
    """The steps to carry out, in their order, in runs of one kind (removals, machines made or provisioned, swarm
    steps): a run ends before the next one starts."""
    phases: list[list[Step]] = []
    for step in steps:
        kind = _KIND.get(step.action)
        if kind is None:
            continue  # nothing to do
        if phases and _KIND[phases[-1][0].action] == kind:
            phases[-1].append(step)
        else:
            phases.append([step])
    return phases


def _blocked(store: Store, step: Step, done: Iterable[Outcome]) -> str | None:
    """Why the step must not run: an earlier step of its machine failed, or one it needs (_NEEDS)."""
    needs = _NEEDS.get(step.action, ())
    if step.action == REMOVE and not _recorded_swarm(store, step.name):
        needs = ()  # in no swarm: its removal takes nothing from one
    for outcome in done:
        if outcome.error and outcome.step.name == step.name:
            return f"{step.name} failed"
        if outcome.error and outcome.step.action in needs:
            return f"{outcome.step.action} {outcome.step.name} failed"
    return None


def _guarded(step: Step, action: Callable[[], str | None]) -> Outcome:
    try:
        return Outcome(step, detail=action() or "")
    except Exception as e:  # any failure is this machine's alone: reported, and the others go on
        return Outcome(step, e)


def _create(store: Store, fleet: Fleet, step: Step) -> str:
    """Make the machine without provisioning, then provision it as the fleet's. A failed provisioning keeps the
    (marked) machine: the next apply provisions it again."""
    spec = step.spec
    assert spec is not None
    create(store, spec.name, spec.driver, spec.options, engine=spec.engine, provision=False, prepare_engine=True)
    with locked(store, spec.name) as (machine, driver):
        return _provision_as_fleets(store, machine, driver, fleet, spec)


def _reprovision(store: Store, fleet: Fleet, step: Step) -> str:
    spec = step.spec
    assert spec is not None
    start(store, spec.name)  # nothing when it runs
    with locked(store, spec.name) as (machine, driver):
        machine.engine = spec.engine
        return _provision_as_fleets(store, machine, driver, fleet, spec)


def _provision_as_fleets(store: Store, machine: Machine, driver: Driver, fleet: Fleet, spec: MachineSpec) -> str:
    """Record the fleet's marker (and the engine settings) it is provisioned with, marked UNPROVISIONED until the
    run succeeds, then provision it. The caller holds the machine's lock."""
    machine.fleet = {**machine.fleet, **spec.marker(fleet.name), UNPROVISIONED: True}
    machine.save()
    changed = _provision(store, machine, driver, fleet, spec)
    machine.fleet = {k: v for k, v in machine.fleet.items() if k != UNPROVISIONED}
    machine.save()
    return _tasks(changed)


def _recreate(store: Store, fleet: Fleet, step: Step) -> str:
    _remove(store, fleet, step)
    return _create(store, fleet, step)


def _remove(store: Store, fleet: Fleet, step: Step) -> None:
    # rm leaves the machine's swarm first (its managers forget it), and refuses when that would cost the swarm its
    # quorum: the step then fails, naming `rm -f`.
    rm(store, step.name)


def _tasks(changed: int) -> str:
    return f"{changed} task{'s' * (changed != 1)} changed"


_MACHINE_ACTIONS: dict[str, Callable[[Store, Fleet, Step], str | None]] = {
    CREATE: _create, REPROVISION: _reprovision, RECREATE: _recreate, REMOVE: _remove,
}


def _provision(store: Store, machine: Machine, driver: Driver, fleet: Fleet, spec: MachineSpec,
               check: bool = False) -> int:
    """The engine's roles, then the machine's extra roles (found in the fleet's roles path), in one play with the
    fleet's variables; the tasks that changed (or would, with `check`). The caller holds the machine's lock."""
    return run_provisioning(store, machine, driver, check=check, extra=spec.vars, roles=spec.roles,
                            roles_path=fleet.roles_path).changed


def _swarm_marker(store: Store, name: str, role: str) -> None:
    with locked(store, name) as (machine, _):
        machine.fleet = {**machine.fleet, "swarm": role}
        machine.save()


def _init(store: Store, fleet: Fleet, step: Step) -> None:
    swarm.init(store, step.name)
    _swarm_marker(store, step.name, "manager")


def _join(store: Store, fleet: Fleet, step: Step) -> None:
    as_manager = step.action == JOIN_MANAGER
    swarm.join(store, step.name, step.via, as_manager=as_manager)
    _swarm_marker(store, step.name, "manager" if as_manager else "worker")


def _set_role(store: Store, fleet: Fleet, step: Step) -> None:
    role = "manager" if step.action == PROMOTE else "worker"
    swarm.set_role(store, step.name, role)
    _swarm_marker(store, step.name, role)


def _leave(store: Store, fleet: Fleet, step: Step) -> str:
    detail = ""
    try:
        swarm.leave(store, step.name, force=True)
    except swarm.NotInSwarm:  # left by hand (`pymachine swarm leave`): as the file wants; the record follows
        detail = "it was in no swarm"
    _swarm_marker(store, step.name, "")
    return detail


_SWARM_ACTIONS: dict[str, Callable[[Store, Fleet, Step], str | None]] = {
    LEAVE_OLD: _leave, INIT: _init, JOIN_MANAGER: _join, JOIN_WORKER: _join, PROMOTE: _set_role, DEMOTE: _set_role,
    LEAVE: _leave,
}
_KIND = {CREATE: "make", REPROVISION: "make", RECREATE: "make", REMOVE: "remove"} | dict.fromkeys(_SWARM_ACTIONS,
                                                                                                 "swarm")


def load_fleet(path: Path) -> Fleet:
    """The fleet file, read and checked in full (FleetError with file:line)."""
    return fleetfile.load(path)
