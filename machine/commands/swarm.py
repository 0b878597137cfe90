"""Docker swarm mode across machines: init, join, leave, promote and demote (set_role), ls.

Everything goes through the engines' mutual-TLS API (machine.engineapi). Join tokens are read from the manager
the moment a machine joins and handed straight to that machine's engine: never printed, logged or stored.
Each node advertises its driver's swarm_address(), and the driver opens its cloud firewall to the swarm's other
machines before a join (EC2: security-group rules naming the peers' groups) and takes that back after a leave.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from machine import ui
from machine.commands.common import load, locked
from machine.commands.queries import engine_client
from machine.drivers.base import Driver
from machine.endpoint import host_of, host_port
from machine.engineapi import SWARM_PORT, EngineAPI
from machine.errors import MachineError
from machine.store import Store


class NotInSwarm(MachineError):
    """The machine's engine is in no swarm."""


def _engine(store: Store, name: str) -> tuple[Driver, EngineAPI]:
    """The machine's driver and a client of its running Docker engine, or why there is none."""
    driver, api = engine_client(store, name)
    if driver.machine.engine.get("engine", "docker") != "docker":
        raise MachineError(f"{name} runs {driver.machine.engine['engine']}, which has no swarm mode (use Docker)")
    return driver, api


def _swarm_of(api: EngineAPI) -> dict[str, Any]:
    """The engine's view of its swarm (/info's Swarm): LocalNodeState, NodeID, ControlAvailable, Cluster…"""
    return api.info().get("Swarm") or {}


def _in_swarm(swarm: dict[str, Any]) -> bool:
    # "pending" and "error" are joins under way or broken: the engine refuses a new init or join in those too.
    return swarm.get("LocalNodeState", "inactive") != "inactive"


def _address(driver: Driver) -> str:
    address = driver.swarm_address()
    if not address:
        raise MachineError(f"machine {driver.machine.name!r} has no address yet")
    return address


def init(store: Store, name: str) -> str:
    """Make a new swarm with the machine as its first manager; the node's id."""
    with locked(store, name):
        driver, api = _engine(store, name)
        if _in_swarm(_swarm_of(api)):
            raise MachineError(f"{name} is already in a swarm (`pymachine swarm leave {name}` first)")
        return api.swarm_init(_address(driver))


def _manager(store: Store, name: str) -> tuple[EngineAPI, dict[str, Any]]:
    """A manager's client and its /info Swarm, refused when the machine manages no swarm."""
    _, api = _engine(store, name)
    swarm = _swarm_of(api)
    if not _in_swarm(swarm):
        raise NotInSwarm(f"{name} is not in a swarm (`pymachine swarm init {name}` makes one)")
    if not swarm.get("ControlAvailable"):
        raise MachineError(f"{name} is a worker of its swarm, not a manager: name one of its managers")
    return api, swarm


def _machines_by_address(store: Store) -> dict[str, Driver]:
    """Every machine of the store that can be read, by the address it advertises to a swarm."""
    found = {}
    for name in store.names():
        try:
            _, driver = load(store, name)
            address = driver.swarm_address()
        except MachineError:  # a damaged or half-made machine is nobody's peer
            continue
        if address:
            found[address] = driver
    return found


def _peers(store: Store, manager: EngineAPI, exclude: str) -> list[Driver]:
    """The store's machines among the manager's swarm nodes (matched by advertised address), but `exclude`."""
    machines = _machines_by_address(store)
    addresses = {node.get("Status", {}).get("Addr", "") for node in manager.nodes()}
    return [d for address, d in machines.items() if address in addresses and d.machine.name != exclude]


def join(store: Store, name: str, manager: str, as_manager: bool = False) -> None:
    """Join the machine to the swarm `manager` manages, as a worker (or as a manager)."""
    if name == manager:
        raise MachineError(f"{name} cannot join its own swarm: name another machine as --manager")
    manager_api, manager_swarm = _manager(store, manager)
    with locked(store, name):
        driver, api = _engine(store, name)
        swarm = _swarm_of(api)
        if _in_swarm(swarm):
            # A worker's /info names no cluster: the manager's node list tells whether it is in that swarm.
            same = swarm.get("NodeID") in {node.get("ID") for node in manager_api.nodes()}
            raise MachineError(f"{name} is already in {'the swarm of ' + manager if same else 'a swarm'} "
                               f"(`pymachine swarm leave {name}` first)")
        token = manager_api.swarm()["JoinTokens"]["Manager" if as_manager else "Worker"]
        peers = _peers(store, manager_api, exclude=name)
        driver.open_swarm_ports(peers)
        try:
            api.swarm_join(_address(driver), [_join_address(manager_api, manager_swarm)], token)
        except MachineError as e:
            # A join that timed out goes on in the background (the engine stays "pending", then "error"), and the
            # engine refuses any other join until it leaves: leave, so that the failed join changed nothing.
            with contextlib.suppress(MachineError):
                if _in_swarm(_swarm_of(api)):
                    api.swarm_leave(force=True)
            driver.close_swarm_ports(peers)
            raise MachineError(f"{e} (pymachine ended that attempt: {name} is in no swarm)") from None


def _join_address(manager: EngineAPI, swarm: dict[str, Any]) -> str:
    """Where a joining engine reaches the swarm: the named manager's own swarm address. The engine asks only the
    first address it is given, and another manager of the list may be down."""
    own = [m["Addr"] for m in swarm.get("RemoteManagers") or () if m.get("NodeID") == swarm.get("NodeID")]
    return own[0] if own else host_port(swarm.get("NodeAddr") or manager.host, SWARM_PORT)


def leave(store: Store, name: str, force: bool = False) -> None:
    """Take the machine out of its swarm; a manager still reachable in the store forgets the node."""
    with locked(store, name):
        driver, api = _engine(store, name)
        swarm = _swarm_of(api)
        if not _in_swarm(swarm):
            raise NotInSwarm(f"{name} is not in a swarm")
        _leave(store, name, driver, api, swarm, force)


def _leave(store: Store, name: str, driver: Driver, api: EngineAPI, swarm: dict[str, Any], force: bool) -> bool:
    """The machine (its engine `api`, in `swarm`) leaves; whether another manager of the store forgot its node."""
    node_id = swarm.get("NodeID", "")
    manager = _other_manager(store, swarm, exclude=name)
    try:
        peers = _peers(store, manager, exclude=name) if manager else []
    except MachineError:  # that manager left meanwhile (one rm of several members of a swarm): none is asked
        manager, peers = None, []
    if force and manager and swarm.get("ControlAvailable"):
        # A manager that leaves takes its vote in the raft store along: of two managers, the one left would
        # have no quorum. Demoted first, it leaves as a worker.
        _change_role(manager, api, name, node_id, "worker")
    api.swarm_leave(force)  # a manager refuses without force: the engine says why (quorum)
    if manager:
        # Left alone, the node stays listed as Down; removed, its tasks are rescheduled at once.
        try:
            manager.remove_node(node_id)
        except MachineError as e:
            ui.err(f"warning: {name} left, but its manager still lists it: {e}")
    driver.close_swarm_ports(peers)
    return manager is not None


def leave_before_removal(store: Store, name: str, force: bool = False) -> None:
    """`rm` of a machine in a swarm (the caller holds its lock): it leaves first, as `swarm leave -f` (a manager
    demoted through another one), so that the swarm forgets it and reschedules its tasks at once, instead of
    listing it Down for good and, a manager, counting its vote in the quorum. When it cannot (a demotion would cost
    the swarm its quorum), the removal stops there; with `force` that is a warning and the machine goes."""
    try:
        driver, api = _engine(store, name)
        swarm = _swarm_of(api)
    except MachineError:
        return  # no engine to ask: not running, never provisioned, or Podman
    if not _in_swarm(swarm):
        return
    try:
        forgotten = _leave(store, name, driver, api, swarm, force=True)
    except MachineError as e:
        if not force:
            raise MachineError(f"{name} cannot leave its swarm ({e}): nothing removed (`pymachine rm -f {name}` "
                               f"removes it anyway, still listed by its managers)") from None
        ui.err(f"warning: {name} did not leave its swarm before its removal ({e}): its managers still list it "
               f"(`docker node rm` it on one)")
        return
    if not forgotten:
        ui.err(f"warning: {name} left its swarm, but no other manager of it is a machine of this store that answers: "
               + ("the swarm's other nodes may be left without a manager" if swarm.get("ControlAvailable")
                  else "its managers list it as Down (`docker node rm` it on one)"))


def set_role(store: Store, name: str, role: str) -> None:
    """Make the machine a manager (promote) or a worker (demote) of its swarm: its node's spec with the new Role,
    through a manager (the machine itself when it is one). The swarm's last manager is never demoted."""
    with locked(store, name):
        _, api = _engine(store, name)
        swarm = _swarm_of(api)
        if not _in_swarm(swarm):
            raise NotInSwarm(f"{name} is not in a swarm")
        manager = api if swarm.get("ControlAvailable") else _other_manager(store, swarm, exclude=name)
        if manager is None:
            raise MachineError(f"no manager of the swarm of {name} is a machine of this store that answers: "
                               f"cannot make {name} a {role}")
        node_id = swarm.get("NodeID", "")
        others = [n for n in manager.nodes() if n.get("ID") != node_id]
        if role == "worker" and not any(n.get("Spec", {}).get("Role") == "manager" for n in others):
            raise MachineError(f"{name} is the last manager of its swarm: it stays a manager (make another "
                               f"machine a manager first)")
        _change_role(manager, api, name, node_id, role)


def _change_role(manager: EngineAPI, api: EngineAPI, name: str, node_id: str, role: str) -> None:
    """The node's spec with its new Role, through `manager`; back once the machine's engine (`api`) acts as one:
    a promoted node joins the managers' raft store seconds after its spec says manager, and a demotion before
    that would find it no fellow manager yet."""
    node = manager.node(node_id)
    manager.update_node(node_id, node["Version"]["Index"], {**node["Spec"], "Role": role})
    deadline = time.monotonic() + api.timeout
    while bool(_swarm_of(api).get("ControlAvailable")) != (role == "manager"):
        if time.monotonic() > deadline:
            raise MachineError(f"{name} does not act as a {role} of its swarm {api.timeout:.0f} s after it was "
                               f"made one")
        time.sleep(0.5)


def _other_manager(store: Store, swarm: dict[str, Any], exclude: str) -> EngineAPI | None:
    """A client of another manager of the swarm that is a machine of this store, if one answers."""
    machines = _machines_by_address(store)
    for remote in swarm.get("RemoteManagers") or ():
        driver = machines.get(host_of(remote.get("Addr", "")))
        if driver is None or driver.machine.name == exclude:
            continue
        try:
            return _manager(store, driver.machine.name)[0]
        except MachineError:
            continue
    return None


def ls(store: Store, manager: str) -> list[dict[str, Any]]:
    """The nodes of the swarm `manager` manages, each with the machine it is (by address), if any."""
    api, _ = _manager(store, manager)
    machines = _machines_by_address(store)
    rows = []
    for node in api.nodes():
        status, spec = node.get("Status", {}), node.get("Spec", {})
        machine = machines.get(status.get("Addr", ""))
        leader = node.get("ManagerStatus", {})
        rows.append({
            "machine": machine.machine.name if machine else "",
            "hostname": node.get("Description", {}).get("Hostname", ""),
            "id": node.get("ID", ""),
            "role": spec.get("Role", ""),
            "state": status.get("State", ""),
            "availability": spec.get("Availability", ""),
            "manager_status": "leader" if leader.get("Leader") else leader.get("Reachability", ""),
            "address": status.get("Addr", ""),
        })
    return sorted(rows, key=lambda r: (r["role"] != "manager", r["machine"] or "~", r["hostname"]))
