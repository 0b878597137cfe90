"""Commands that only look: ls, status, ip, url, env, config, inspect, active, version."""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from machine import __version__, certs
from machine.commands.common import UNFINISHED, driver_for, load
from machine.drivers.base import Driver, State
from machine.engineapi import EngineAPI
from machine.errors import MachineError, UsageError
from machine.store import Machine, RecordDamaged, Store


class NotRunning(MachineError):
    """The machine is not running: its engine cannot be asked."""


def describe(store: Store, name: str) -> dict[str, Any]:
    """The row `ls` shows for one machine; a broken machine still gets a row, with its error."""
    try:
        machine, driver, state, error = condition(store, name)
        row = {"name": name, "driver": machine.driver, "state": state.value, "url": driver.engine_url(),
               "error": error}
    except RecordDamaged as e:
        row = {"name": name, "driver": "", "state": State.ERROR.value, "url": "", "error": _damaged(store, name, e)}
    except MachineError as e:
        row = {"name": name, "driver": "", "state": State.ERROR.value, "url": "", "error": str(e)}
    row["active"] = bool(row["url"]) and os.environ.get("DOCKER_HOST") == row["url"]
    return row


def unfinished(store: Store, machine: Machine) -> str:
    """Why the machine is not one to use, when a create or an rm of it was killed part way; "" otherwise, and
    while a command still holds it (the kernel drops a killed command's lock)."""
    if machine.state not in UNFINISHED or store.busy(machine.name):
        return ""
    return UNFINISHED[machine.state].format(name=machine.name)


def condition(store: Store, name: str) -> tuple[Machine, Driver, State, str]:
    """The machine, its driver, its state and what is wrong with it ("" when nothing), as ls, status and inspect
    show them. A create or a removal that was killed leaves a machine that is neither made nor gone, whatever
    its host does."""
    machine, driver = load(store, name)
    if unfinished(store, machine):
        # Read again: a command that ended between the two looks saved its outcome before it let go of the lock.
        machine, driver = load(store, name)
    why, state = unfinished(store, machine), driver.state()
    if why:
        return machine, driver, State.ERROR, why
    if machine.state == "creating" and state != State.RUNNING:
        # Being made: not booted yet, or booting (its processes there before its supervisor is recorded).
        state = State.STARTING
    return machine, driver, state, _left(driver) if machine.state == "error" else ""


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


# docker-machine's filter keys; `label` matches the engine's labels (KEY=VALUE).
FILTER_KEYS = ("name", "driver", "state", "label")


def parse_filters(filters: Iterable[str]) -> dict[str, list[str]]:
    parsed: dict[str, list[str]] = {}
    for item in filters:
        key, sep, value = item.partition("=")
        if not sep or key not in FILTER_KEYS:
            raise UsageError(f"--filter {item!r}: use name=GLOB, driver=NAME, state=STATE or label=KEY=VALUE")
        parsed.setdefault(key, []).append(value)
    return parsed


def _matches(store: Store, row: dict[str, Any], key: str, values: list[str]) -> bool:
    if key == "label":
        try:
            labels = store.load(row["name"]).engine.get("engine_labels", [])
        except MachineError:
            return False
        return any(v in labels for v in values)
    return any(fnmatch.fnmatchcase(str(row[key]).lower(), v.lower()) for v in values)


def ls(store: Store, filters: Iterable[str] = (), timeout: float | None = None) -> list[dict[str, Any]]:
    """Machines matching every filter key (values of one key are alternatives). With `timeout`, a machine whose
    driver does not answer in time is listed in state Timeout, as docker-machine's `ls --timeout` does."""
    wanted = parse_filters(filters)
    names = store.names()
    described = _describe_all(store, names, timeout) if timeout else {name: describe(store, name) for name in names}
    # A machine an rm took away after it was listed is not an error ("no machine named"): it is no machine.
    rows = [row for row in described.values() if row["state"] != State.ERROR.value or store.exists(row["name"])]
    return [row for row in rows if all(_matches(store, row, k, vs) for k, vs in wanted.items())]


def _describe_all(store: Store, names: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Every machine described at once; a driver still asking after `timeout` is left behind (daemon threads:
    the process may exit without them)."""
    rows: dict[str, dict[str, Any]] = {}
    threads = [threading.Thread(target=lambda n=name: rows.__setitem__(n, describe(store, n)), daemon=True)
               for name in names]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    timed_out = {"driver": "", "state": "timeout", "url": "", "active": False,
                 "error": f"no answer from the driver within {timeout:g} s"}
    return {name: dict(rows.get(name) or {"name": name, **timed_out}) for name in names}


def machine_fields(row: dict[str, Any]) -> dict[str, Any]:
    """An `ls` row under the names docker-machine's `ls --format` templates use."""
    return {
        "Name": row["name"], "Active": "*" if row["active"] else "-", "ActiveHost": row["active"],
        "ActiveSwarm": False, "DriverName": row["driver"], "State": row["state"].capitalize(), "URL": row["url"],
        "Swarm": "", "Error": row["error"],
    }


# What a template is checked against before any machine is asked anything: an unknown field is an error even
# when no machine is listed.
SAMPLE_ROW = {"name": "", "active": False, "driver": "", "state": "", "url": "", "error": ""}


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
        raise driver.not_running()
    return driver.engine_url()


def cert_dir(store: Store, name: str) -> tuple[Driver, Path]:
    """The machine's driver and its DOCKER_CERT_PATH, once its certificates name its current address."""
    machine, driver = load(store, name)
    server = certs.server_pair(machine.dir)
    if not server.cert.exists() or not (machine.dir / "cert.pem").exists():
        raise MachineError(f"machine {name!r} has no engine certificates yet (run `pymachine provision {name}`)")
    address = driver.ip()
    if not address or not certs.carries(server.cert, [address]):
        raise MachineError(
            f"the engine certificate of {name!r} does not name its address {address} "
            f"(run `pymachine regenerate-certs {name}`)"
        )
    return driver, machine.dir


def engine_client(store: Store, name: str) -> tuple[Driver, EngineAPI]:
    """The machine's driver and a client of its running engine over mutual TLS, or why there is none."""
    driver, certs_path = cert_dir(store, name)
    if driver.state() != State.RUNNING:
        raise NotRunning(str(driver.not_running()))
    return driver, EngineAPI(name, driver.engine_url(), certs_path)


def env(store: Store, name: str) -> dict[str, str]:
    """The docker CLI's variables for the machine."""
    driver, certs_path = cert_dir(store, name)
    return {
        "DOCKER_TLS_VERIFY": "1",
        "DOCKER_HOST": driver.engine_url(),
        "DOCKER_CERT_PATH": str(certs_path),
        "DOCKER_MACHINE_NAME": name,
    }


def config(store: Store, name: str) -> list[str]:
    """The docker CLI's TLS flags for the machine."""
    driver, certs_path = cert_dir(store, name)
    return [
        "--tlsverify",
        f"--tlscacert={certs_path / 'ca.pem'}",
        f"--tlscert={certs_path / 'cert.pem'}",
        f"--tlskey={certs_path / 'key.pem'}",
        f"-H={driver.engine_url()}",
    ]


def inspect(store: Store, name: str) -> dict[str, Any]:
    machine, driver, state, error = condition(store, name)
    endpoint = driver.ssh_endpoint() if driver.ip() else None
    return {
        "name": machine.name,
        "driver": machine.driver,
        "id": machine.id,
        "created": machine.created,
        "state": state.value,
        "error": error,
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


def docker_machine_host(store: Store, name: str) -> dict[str, Any]:
    """`inspect` in docker-machine's shape (its host JSON), so `inspect --format '{{.Driver.IPAddress}}'` and
    friends keep working; pymachine's own fields are there too, under their own (lower-case) names."""
    own = inspect(store, name)
    ssh = own["ssh"] or {}
    machine = store.load(name)
    server = certs.server_pair(machine.dir)
    certs_dir = store.certs_dir
    return {
        **own,
        "ConfigVersion": 3,
        "Name": own["name"],
        "DriverName": own["driver"],
        "Driver": {
            "MachineName": own["name"], "IPAddress": own["ip"] or "", "SSHUser": ssh.get("user", ""),
            "SSHPort": ssh.get("port", 0), "SSHKeyPath": ssh.get("key", ""), "StorePath": str(store.home),
        },
        "HostOptions": {
            "EngineOptions": _engine_options(machine.engine),
            "AuthOptions": {
                "CertDir": str(certs_dir), "CaCertPath": str(certs_dir / "ca.pem"),
                "ClientCertPath": str(certs_dir / "cert.pem"), "ClientKeyPath": str(certs_dir / "key.pem"),
                "ServerCertPath": str(server.cert), "ServerKeyPath": str(server.key), "StorePath": own["store"],
            },
        },
    }


def _engine_options(engine: dict[str, Any]) -> dict[str, Any]:
    return {
        "StorageDriver": engine.get("engine_storage_driver", ""), "Labels": engine.get("engine_labels", []),
        "InsecureRegistry": engine.get("engine_insecure_registries", []),
        "RegistryMirror": engine.get("engine_registry_mirrors", []), "Env": engine.get("engine_env", {}),
    }


def active(store: Store) -> str:
    for row in ls(store):
        if row["active"]:
            return row["name"]
    raise MachineError("no active machine (DOCKER_HOST does not point at one; see `pymachine env`)")


def version() -> str:
    return f"pymachine version {__version__}"


def engine_version(store: Store, name: str) -> str:
    """The version of the machine's engine, as its API gives it (docker-machine's `version NAME`)."""
    return str(engine_client(store, name)[1].request("GET", "/version").get("Version", ""))
