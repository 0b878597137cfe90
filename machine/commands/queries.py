"""Commands that only look: ls, status, ip, url, inspect, active, version."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from typing import Any

from machine import __version__
from machine.commands.common import driver_for, load
from machine.drivers.base import Driver, State
from machine.errors import MachineError, UsageError
from machine.store import RecordDamaged, Store


def describe(store: Store, name: str) -> dict[str, Any]:
    """The row `ls` shows for one machine; a broken machine still gets a row, with its error."""
    try:
        machine, driver = load(store, name)
        state, url = driver.state(), driver.engine_url()
        if machine.state == "creating" and state == State.STOPPED:
            state = State.ERROR
        error = _left(driver) if machine.state == "error" else ""
        row = {"name": name, "driver": machine.driver, "state": state.value, "url": url, "error": error}
    except RecordDamaged as e:
        row = {"name": name, "driver": "", "state": State.ERROR.value, "url": "", "error": _damaged(store, name, e)}
    except MachineError as e:
        row = {"name": name, "driver": "", "state": State.ERROR.value, "url": "", "error": str(e)}
    row["active"] = bool(row["url"]) and os.environ.get("DOCKER_HOST") == row["url"]
    return row


def _left(driver: Driver) -> str:
    left = driver.leftovers()
    return f"left: {', '.join(left)}" if left else ""


def _damaged(store: Store, name: str, damage: RecordDamaged) -> str:
    """What is wrong with a damaged record and, from the journal, what of the machine still exists."""
    try:
        machine = store.recover(name)
        left = _left(driver_for(store, machine)) or "nothing left"
    except MachineError as e:
        return f"{damage}; {e}"
    return f"{damage}; {left} (`pymachine rm -f {name}` removes it)"


def parse_filters(filters: Iterable[str]) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or key not in ("name", "driver", "state"):
            raise UsageError(f"--filter {item!r}: use name=GLOB, driver=NAME or state=STATE")
        parsed.setdefault(key, []).append(value)
    return parsed


def ls(store: Store, filters: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Machines matching every filter key (values of one key are alternatives)."""
    wanted = parse_filters(filters)
    rows = []
    for name in store.names():
        row = describe(store, name)
        if all(any(fnmatch.fnmatchcase(str(row[k]).lower(), v.lower()) for v in vs) for k, vs in wanted.items()):
            rows.append(row)
    return rows


def status(store: Store, name: str) -> str:
    return describe_existing(store, name)["state"]


def describe_existing(store: Store, name: str) -> dict[str, Any]:
    store.load(name)  # a missing machine is an error, not an Error row
    return describe(store, name)


def ip(store: Store, name: str) -> str:
    _, driver = load(store, name)
    address = driver.ip()
    if not address:
        raise MachineError(f"machine {name!r} has no IP address")
    return address


def url(store: Store, name: str) -> str:
    _, driver = load(store, name)
    if driver.state() != State.RUNNING:
        raise MachineError(f"machine {name!r} is not running")
    return driver.engine_url()


def inspect(store: Store, name: str) -> dict[str, Any]:
    machine, driver = load(store, name)
    endpoint = driver.ssh_endpoint() if driver.ip() else None
    return {
        "name": machine.name,
        "driver": machine.driver,
        "id": machine.id,
        "created": machine.created,
        "state": driver.state().value,
        "provisioning": machine.state,
        "ip": driver.ip(),
        "url": driver.engine_url(),
        "ssh": {
            "host": endpoint.host, "port": endpoint.port, "user": endpoint.user,
            "key": str(machine.key_path), "known_hosts": str(machine.known_hosts_path),
        } if endpoint else None,
        "options": machine.options,
        "resources": machine.resources,
        "store": str(machine.dir),
    }


def active(store: Store) -> str:
    for row in ls(store):
        if row["active"]:
            return row["name"]
    raise MachineError("no active machine (DOCKER_HOST does not point at one; see `pymachine env`)")


def version() -> str:
    return f"pymachine version {__version__}"

