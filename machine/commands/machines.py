"""Commands that make, run and remove machines."""

from __future__ import annotations

import shutil
import socket
import ssl
import time
from typing import Any
from urllib.parse import urlparse

import drivers
from drivers.base import Driver, State
from machine import certs, dockercontext, sshkeys, ui
from machine.commands.common import connect, engine_url, load
from machine.commands.engine import run_provisioning, server_pair
from machine.errors import MachineError, UsageError
from machine.names import validate_name
from machine.store import Machine, Store, write_atomic

# dockerd starts after sshd in a boot, and much later in a guest that QEMU emulates (TCG).
ENGINE_READY_TIMEOUT = 180.0


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
           engine: dict[str, Any] | None = None, keep_on_failure: bool = False, reporter=None) -> Machine:
    """Make, boot and (given `engine`, from provision.engine_config) provision a machine, or leave nothing."""
    validate_name(name)
    values = parse_driver_options(driver_name, options or {})
    if store.exists(name):
        raise UsageError(f"machine {name!r} already exists")
    cls = drivers.get(driver_name)
    cls.pre_create_check(values)
    machine = store.reserve(name, driver_name, values, engine)
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
            if engine is None:
                machine.state = "ready"
                machine.save()
            else:
                run_provisioning(store, machine, driver, reporter=reporter)
    except BaseException:
        if keep_on_failure:
            machine.state = "error"
            machine.save()
        else:
            remove_machine(store, machine, driver)
        raise
    return machine


# -- lifecycle ---------------------------------------------------------------------------------------------
def start(store: Store, name: str) -> None:
    machine, driver = load(store, name)
    with machine.lock():
        if driver.state() == State.RUNNING:
            return
        before = engine_url(driver)
        driver.start()
        connect(machine, driver).close()
        _follow_engine(machine, driver, before)


def stop(store: Store, name: str) -> None:
    machine, driver = load(store, name)
    with machine.lock():
        driver.stop()


def restart(store: Store, name: str) -> None:
    machine, driver = load(store, name)
    with machine.lock():
        before = engine_url(driver)
        driver.restart()
        connect(machine, driver).close()
        _follow_engine(machine, driver, before)


def _follow_engine(machine: Machine, driver: Driver, before: str) -> None:
    """After a boot: keep the docker context pointing at the engine (a new lease, another forwarded port) and
    return once the engine answers, or say that its certificate must be reissued for the new address."""
    cert = server_pair(machine).cert
    if machine.state != "ready" or not cert.exists():
        return  # never provisioned: no engine to wait for
    if driver.ip() not in certs.sans_of(cert):
        ui.err(f"warning: {machine.name} came back at {driver.ip()}, which its engine certificate does not "
               f"name: run `pymachine regenerate-certs {machine.name}`")
        return
    url = engine_url(driver)
    if url != before:
        dockercontext.save(machine.name, url, machine.dir)
    with ui.step(f"waiting for the engine of {machine.name}"):
        _wait_engine(machine, url)


def _wait_engine(machine: Machine, url: str, timeout: float = ENGINE_READY_TIMEOUT) -> None:
    """Wait for a mutual-TLS handshake with the engine, as the docker CLI will make.

    sshd answers before the engine has started, and a port QEMU forwards accepts connections before anything
    listens behind it: only a handshake tells that the engine is there.
    """
    address = urlparse(url)
    context = ssl.create_default_context(cafile=machine.dir / "ca.pem")
    context.load_cert_chain(machine.dir / "cert.pem", machine.dir / "key.pem")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address.hostname, address.port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname=address.hostname):
                return
        except ssl.SSLCertVerificationError as e:
            raise MachineError(f"the engine of {machine.name} at {url} has a certificate pymachine did not issue "
                               f"({e.verify_message}): run `pymachine regenerate-certs {machine.name}`") from None
        except OSError as e:  # refused, reset, or closed by a forwarder with nothing behind it
            if time.monotonic() > deadline:
                raise MachineError(f"the engine of {machine.name} did not answer at {url} within "
                                   f"{timeout:.0f}s: {e}") from None
            time.sleep(0.5)


def kill(store: Store, name: str) -> None:
    machine, driver = load(store, name)
    with machine.lock():
        driver.kill()


def remove_machine(store: Store, machine: Machine, driver: Driver, force: bool = False) -> None:
    dockercontext.remove(machine.name)
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

