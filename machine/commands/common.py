"""What every command needs: a machine's driver, an SSH session to it, its engine URL."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from machine import drivers
from machine.become import check_root
from machine.drivers.base import Driver
from machine.errors import MachineError
from machine.store import Machine, Store

if TYPE_CHECKING:
    from machine.roles import Recap
    from machine.ssh import Connection

SSH_READY_TIMEOUT = 120.0
# A record left in one of these states by a command that no longer runs: what the machine is, and what to do.
UNFINISHED = {
    "creating": "its create was interrupted: `pymachine rm -f {name}` removes what it made",
    "removing": "its removal was interrupted: `pymachine rm -f {name}` finishes it",
}


def driver_for(store: Store, machine: Machine) -> Driver:
    return drivers.get(machine.driver)(machine, store)


def load(store: Store, name: str) -> tuple[Machine, Driver]:
    """The machine and its driver, for a command that only looks (config.json is replaced atomically)."""
    machine = store.load(name)
    return machine, driver_for(store, machine)


@contextlib.contextmanager
def locked(store: Store, name: str, recover: bool = False) -> Iterator[tuple[Machine, Driver]]:
    """The machine and its driver under the machine's lock, for a command that changes it."""
    with store.locked(name, recover=recover) as machine:
        yield machine, driver_for(store, machine)


def refuse_half_removed(machine: Machine) -> None:
    """Never boot or provision what a killed rm left (under the lock, a record still `removing` is one): its
    address, UID range and image marks may be gone already, and a cache prune could take its base from under it."""
    if machine.state == "removing":
        raise MachineError(UNFINISHED["removing"].format(name=machine.name))


def connect(machine: Machine, driver: Driver, timeout: float = SSH_READY_TIMEOUT) -> Connection:
    from machine.ssh import Connection  # late: the commands that only look (ip, env, ls) never connect

    endpoint = driver.ssh_endpoint()._replace(name=machine.name)
    return Connection.wait_ready(endpoint, machine.key_path, machine.known_hosts_path,
                                 timeout=timeout, is_alive=driver.is_alive)


def play_failed(conn: Connection, recap: Recap, what: str) -> MachineError:
    """The error of a failed play, `what` failed: the failed task's, or, when the login cannot become root (its
    sudoers changed since the host was adopted), that, naming the rule it needs (raised at once)."""
    if conn.endpoint.needs_become:
        check_root(conn, what)
    return MachineError(f"{what}: {recap.failure}")
