"""One function per user command, over the store, a driver and SSH. The CLI only parses and prints."""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import drivers
from drivers.base import Driver, State
from machine import __version__, sshkeys, ui
from machine.errors import MachineError, UsageError
from machine.names import validate_name
from machine.ssh import Connection
from machine.store import Machine, Store, write_atomic

ENGINE_PORT = 2376
SSH_READY_TIMEOUT = 120.0


def driver_for(store: Store, machine: Machine) -> Driver:
    return drivers.get(machine.driver)(machine, store)


def load(store: Store, name: str) -> tuple[Machine, Driver]:
    machine = store.load(name)
    return machine, driver_for(store, machine)


def parse_driver_options(driver_name: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Typed values of the chosen driver's options; a flag of another driver is an error."""
    cls = drivers.get(driver_name)
    own = {o.key for o in cls.options}
    foreign = sorted(k for k, v in raw.items() if v is not None and k not in own)
    if foreign:
        flag = "--" + foreign[0].replace("_", "-")
        raise UsageError(f"{flag} is not an option of the {driver_name} driver")
    return {o.key: o.parse(raw.get(o.key)) for o in cls.options}


# -- create ------------------------------------------------------------------------------------------------
def create(store: Store, name: str, driver_name: str = drivers.DEFAULT, options: dict[str, Any] | None = None,
           provision: bool = True, keep_on_failure: bool = False) -> Machine:
    validate_name(name)
    values = parse_driver_options(driver_name, options or {})
    if store.exists(name):
        raise UsageError(f"machine {name!r} already exists")
    cls = drivers.get(driver_name)
    cls.pre_create_check(values)
    machine = store.reserve(name, driver_name, values)
    driver = cls(machine, store)
    try:
        with machine.lock():
            keys = sshkeys.new_keypair(f"pymachine@{name}")
            write_atomic(machine.key_path, keys.private_openssh, 0o600)
            write_atomic(machine.key_path.with_suffix(".pub"), (keys.public_line + "\n").encode(), 0o644)
            with ui.step(f"creating {name} ({driver_name})"):
                driver.create()
            with ui.step(f"waiting for SSH on {name}"), connect(machine, driver):
                pass
            if provision:
                pass  # provisioning (engine, TLS) arrives with the role engine
            machine.state = "ready"
            machine.save()
    except BaseException:
        if keep_on_failure:
            machine.state = "error"
            machine.save()
        else:
            remove_machine(store, machine, driver)
        raise
    return machine


def connect(machine: Machine, driver: Driver, timeout: float = SSH_READY_TIMEOUT) -> Connection:
    return Connection.wait_ready(driver.ssh_endpoint(), machine.key_path, machine.known_hosts_path,
                                 timeout=timeout, is_alive=driver.is_alive)


# -- queries -----------------------------------------------------------------------------------------------
def engine_url(driver: Driver) -> str:
    address = driver.ip()
    return f"tcp://{address}:{ENGINE_PORT}" if address else ""


def describe(store: Store, name: str) -> dict[str, Any]:
    """The row `ls` shows for one machine; a broken machine still gets a row, with its error."""
    try:
        machine, driver = load(store, name)
        state, url = driver.state(), engine_url(driver)
        if machine.state == "creating" and state == State.STOPPED:
            state = State.ERROR
        row = {"name": name, "driver": machine.driver, "state": state.value, "url": url, "error": ""}
    except MachineError as e:
        row = {"name": name, "driver": "", "state": State.ERROR.value, "url": "", "error": str(e)}
    row["active"] = bool(row["url"]) and os.environ.get("DOCKER_HOST") == row["url"]
    return row


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
    return engine_url(driver)


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
        "url": engine_url(driver),
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


# -- lifecycle ---------------------------------------------------------------------------------------------
def start(store: Store, name: str) -> None:
    machine, driver = load(store, name)
    with machine.lock():
        if driver.state() == State.RUNNING:
            return
        driver.start()
        connect(machine, driver).close()


def stop(store: Store, name: str) -> None:
    machine, driver = load(store, name)
    with machine.lock():
        driver.stop()


def restart(store: Store, name: str) -> None:
    machine, driver = load(store, name)
    with machine.lock():
        driver.restart()
        connect(machine, driver).close()


def kill(store: Store, name: str) -> None:
    machine, driver = load(store, name)
    with machine.lock():
        driver.kill()


def remove_machine(store: Store, machine: Machine, driver: Driver, force: bool = False) -> None:
    try:
        driver.remove()
    except MachineError:
        if not force:
            raise
    store.delete(machine)


def rm(store: Store, name: str, force: bool = False) -> None:
    """Remove a machine and all it owns; with `force`, also one whose driver cannot clean up."""
    if not store.exists(name):
        raise MachineError(f"no machine named {name!r}")
    try:
        machine, driver = load(store, name)
    except MachineError:
        if not force:
            raise
        shutil.rmtree(store.machines_dir / name, ignore_errors=True)
        return
    with machine.lock():
        remove_machine(store, machine, driver, force)


# -- ssh and scp -------------------------------------------------------------------------------------------
def ssh(store: Store, name: str, command: list[str]) -> int:
    """Run `command` on the machine (an interactive shell when empty); return its exit status."""
    machine, driver = load(store, name)
    if driver.state() != State.RUNNING:
        raise MachineError(f"machine {name!r} is not running")
    endpoint = driver.ssh_endpoint()
    client = shutil.which("ssh")
    if client:
        argv = [
            client, "-i", str(machine.key_path), "-p", str(endpoint.port),
            "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR",
            "-o", f"UserKnownHostsFile={machine.known_hosts_path}", "-o", "ConnectTimeout=10",
            f"{endpoint.user}@{endpoint.host}",
        ]
        return subprocess.call([*argv, *command])
    if not command:
        raise MachineError("an interactive shell needs the ssh client (Debian: apt-get install openssh-client)")
    with connect(machine, driver, timeout=10) as conn:
        stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
        result = conn.run(shlex.join(command) if len(command) > 1 else command[0], stdin=stdin,
                          stream=_write_stream)
    return result.rc


def _write_stream(kind: str, data: bytes) -> None:
    out = sys.stdout if kind == "stdout" else sys.stderr
    out.buffer.write(data)
    out.flush()


def _split(store: Store, spec: str) -> tuple[str | None, str]:
    """'NAME:PATH' names a machine's path when NAME is a machine; anything else is local."""
    head, sep, tail = spec.partition(":")
    if sep and head and "/" not in head and store.exists(head):
        return head, tail or "."
    return None, spec


def scp(store: Store, source: str, destination: str, recursive: bool = False) -> None:
    src_machine, src_path = _split(store, source)
    dst_machine, dst_path = _split(store, destination)
    if src_machine is None and dst_machine is None:
        raise UsageError("one side of scp must be MACHINE:PATH")
    if src_machine is not None and dst_machine is not None:
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / Path(src_path.rstrip("/")).name
            _copy(store, src_machine, src_path, staged, download=True, recursive=recursive)
            _copy(store, dst_machine, dst_path, staged, download=False, recursive=recursive)
        return
    if src_machine is not None:
        _copy(store, src_machine, src_path, Path(dst_path), download=True, recursive=recursive)
    else:
        if not Path(src_path).exists():
            raise UsageError(f"{src_path}: no such file or directory")
        _copy(store, dst_machine, dst_path, Path(src_path), download=False, recursive=recursive)


def _copy(store: Store, name: str, remote: str, local: Path, download: bool, recursive: bool) -> None:
    machine, driver = load(store, name)
    if driver.state() != State.RUNNING:
        raise MachineError(f"machine {name!r} is not running")
    with connect(machine, driver, timeout=10) as conn:
        try:
            if download:
                target = local / Path(remote.rstrip("/")).name if local.is_dir() else local
                conn.get(remote, target, recursive)
            else:
                target = remote.rstrip("/") + "/" + local.name if conn.remote_is_dir(remote) else remote
                conn.put(local, target, recursive)
        except FileNotFoundError as e:
            raise MachineError(f"{name}: {e.filename or remote}: no such file or directory") from None
        except PermissionError as e:
            raise MachineError(f"{name}: {e.filename or remote}: permission denied") from None
