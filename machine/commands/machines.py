"""Commands that make, run and remove machines."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from typing import Any
from urllib.parse import urlparse

from machine import certs, dockercontext, drivers, enginecache, sshfs, sshkeys, sshmux, ui
from machine import provision as plan
from machine.commands.common import connect, locked, play_failed, refuse_half_removed
from machine.commands.engine import run_provisioning
from machine.drivers.base import Driver, State
from machine.errors import MachineError, UsageError
from machine.names import validate_name
from machine.paths import roles_dir
from machine.store import Machine, RecordDamaged, Store, write_atomic

# dockerd starts after sshd in a boot, and much later in a guest that QEMU emulates (TCG).
ENGINE_READY_TIMEOUT = 180.0


def parse_driver_options(driver_name: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Typed values of the chosen driver's options; a flag of another driver is an error."""
    cls = drivers.get(driver_name)
    own = {o.key for o in cls.options}
    foreign = sorted(k for k, v in raw.items() if v not in (None, ()) and k not in own)
    if foreign:
        flag = "--" + foreign[0].replace("_", "-")
        raise UsageError(f"{flag} is not an option of the {driver_name} driver")
    return {o.key: o.parse(raw.get(o.key)) for o in cls.options}


# -- create ------------------------------------------------------------------------------------------------
def create(store: Store, name: str, driver_name: str = drivers.DEFAULT, options: dict[str, Any] | None = None,
           engine: dict[str, Any] | None = None, provision: bool = True, keep_on_failure: bool = False,
           reporter=None, wait_for_ssh: bool = True, prepare_engine: bool | None = None) -> Machine:
    """Make and boot a machine and, with `provision`, install its engine (configured by `engine`, from
    provision.engine_config, recorded either way for a later `provision`); on failure leave nothing.
    Without `wait_for_ssh`, return once the host is made (and so without provisioning). `prepare_engine`: make the
    host with the engine's packages from the driver's cache (default: when this create provisions; a caller that
    provisions the machine itself right after says True)."""
    provision = provision and wait_for_ssh
    prepare_engine = provision if prepare_engine is None else prepare_engine
    validate_name(name)
    values = parse_driver_options(driver_name, options or {})
    if store.exists(name):
        raise UsageError(f"machine {name!r} already exists")
    cls = drivers.get(driver_name)
    if provision:
        plan.check_roles()
    cls.pre_create_check(values)
    cls.check_engine(values, engine or {})
    recorded, secrets = cls.split_secrets(values)
    with store.reserve(name, driver_name, recorded, engine) as machine:
        driver = cls(machine, store, secrets)
        try:
            if cls.makes_key:
                keys = sshkeys.new_keypair(f"pymachine@{name}")
                write_atomic(machine.key_path, keys.private_openssh, 0o600)
                write_atomic(machine.key_path.with_suffix(".pub"), (keys.public_line + "\n").encode(), 0o644)
            packages = enginecache.package_set(engine or {}) if prepare_engine else None
            if packages is not None and isinstance(driver, enginecache.PreparesPackages):
                driver.prepare_packages(packages)  # a host with them installed: provisioning then finds them there
            with ui.step(f"creating {name} ({driver_name})"):
                driver.create()
            if wait_for_ssh:
                with ui.step(f"waiting for SSH on {name}"), connect(machine, driver):
                    pass
            if provision:
                run_provisioning(store, machine, driver, reporter=reporter)
            else:
                machine.state = "ready"
                machine.save()
        except BaseException:
            if keep_on_failure:
                machine.state = "error"
                machine.save()
            else:
                _roll_back(store, machine, driver)
            raise
    return machine


def _roll_back(store: Store, machine: Machine, driver: Driver) -> None:
    """Undo a failed create; a failed undo is reported, but the create's own error is the one raised."""
    try:
        remove_machine(store, machine, driver, force=True)
    except Exception as e:
        ui.err(f"warning: cleaning up after the failed create of {machine.name} failed: {e}")


# -- lifecycle ---------------------------------------------------------------------------------------------
def start(store: Store, name: str) -> None:
    with locked(store, name) as (machine, driver):
        refuse_half_removed(machine)
        if driver.state() == State.RUNNING:
            return
        before = driver.engine_url()
        driver.start()
        connect(machine, driver).close()
        _follow_engine(machine, driver, before)


def stop(store: Store, name: str) -> None:
    with locked(store, name) as (machine, driver):
        sshmux.forget(machine.known_hosts_path)
        driver.stop()


def restart(store: Store, name: str) -> None:
    with locked(store, name) as (machine, driver):
        refuse_half_removed(machine)
        before = driver.engine_url()
        sshmux.forget(machine.known_hosts_path)
        driver.restart()
        connect(machine, driver).close()
        _follow_engine(machine, driver, before)


def _follow_engine(machine: Machine, driver: Driver, before: str) -> None:
    """After a boot: keep the docker context pointing at the engine (a new lease, another forwarded port) and
    return once the engine answers, or say that its certificate must be reissued for the new address."""
    cert = certs.server_pair(machine.dir).cert
    if machine.state != "ready" or not cert.exists():
        return  # never provisioned: no engine to wait for
    if not certs.carries(cert, [driver.ip()]):
        ui.err(f"warning: {machine.name} came back at {driver.ip()}, which its engine certificate does not "
               f"name: run `pymachine regenerate-certs {machine.name}`")
        return
    url = driver.engine_url()
    if url != before:
        dockercontext.save(machine.name, url, machine.dir)
    with ui.step(f"waiting for the engine of {machine.name}"):
        _wait_engine(machine, url)


def _wait_engine(machine: Machine, url: str, timeout: float = ENGINE_READY_TIMEOUT) -> None:
    """Wait for a mutual-TLS handshake with the engine, as the docker CLI will make.

    sshd answers before the engine has started, and a port QEMU forwards accepts connections before anything
    listens behind it: only a handshake tells that the engine is there.
    """
    import ssl  # here: of the commands that load this module (rm, start, apply of a fleet) only create uses it

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
    with locked(store, name) as (machine, driver):
        sshmux.forget(machine.known_hosts_path)
        driver.kill()


def remove_machine(store: Store, machine: Machine, driver: Driver, force: bool = False, forget: bool = False) -> None:
    """Remove what the machine made, then its directory; while anything is left, keep the record and say what.

    Without `force` any error of the driver stops the removal; with it, only what is really left does. With
    `forget`, nothing does (the libvirt host or cloud account is gone): what may be left, and what the machine
    recorded, are printed for the user to look after, as the record that named them goes.
    """
    machine.state = "removing"  # until it is gone: a removal killed part way is never taken for a machine
    with contextlib.suppress(OSError):  # a full disk: rm is what frees it, and must not need room to start
        machine.save()
    # A mount over a connection of its own (no kept one) to a host that stays (generic) would outlive the machine.
    for mountpoint in sshfs.mounts(machine.dir):
        sshfs.unmount(mountpoint, lazy=True)
    dockercontext.remove(machine.name, machine.dir)
    sshmux.forget(machine.known_hosts_path)
    error: MachineError | None = None
    try:
        driver.remove()
    except MachineError as e:
        error = e
    left = driver.leftovers()
    if forget and (left or error):
        ui.err(f"warning: {machine.name} forgotten; "
               + (f"left: {', '.join(left)}" if left else f"not removed: {error}")
               + f"; it recorded {json.dumps(machine.resources, sort_keys=True)}")
    elif left or (error and not force):
        machine.state = "error"
        machine.save()  # a record recovered from the journal is written back: the evidence stays
        detail = f"{error}; " if error else ""
        what = f"left: {', '.join(left)}" if left else "nothing left; `rm -f` forgets it"
        raise MachineError(f"could not remove {machine.name}: {detail}{what} (its record is kept: run "
                           f"`pymachine rm -f {machine.name}` again, or `pymachine rm --forget {machine.name}` to "
                           f"drop it and look after what is left yourself)")
    store.delete(machine)


def rm(store: Store, name: str, force: bool = False, uninstall: bool = False, reporter=None,
       forget: bool = False) -> None:
    """Remove a machine and all it owns; with `force` (implied by `forget`), also one whose config.json is damaged
    (from its journal). With `uninstall`, first take off the host what provisioning installed (role `uninstall`)."""
    force = force or forget
    try:
        with locked(store, name, recover=force) as (machine, driver):
            if not forget:  # the host may be out of reach for good: no engine to ask
                from machine.commands.swarm import leave_before_removal  # late: only rm needs the swarm commands

                leave_before_removal(store, name, force)
            if uninstall:
                _uninstall(machine, driver, reporter)
            remove_machine(store, machine, driver, force, forget)
    except RecordDamaged as e:
        raise MachineError(f"{e}: `pymachine rm -f {name}` removes what its journal records") from None


UNINSTALL_ROLE = "uninstall"


def _uninstall(machine: Machine, driver: Driver, reporter=None) -> None:
    """Run the `uninstall` role on the running host, as provisioning runs its roles; the record stays if it fails."""
    from machine.roles import run_roles

    roles = roles_dir()
    if driver.state() != State.RUNNING:
        raise driver.not_running()
    settings = {k: v for k, v in machine.engine.items() if k != "tls_san"} | {"tls_dir": plan.TLS_DIR}
    with connect(machine, driver, timeout=30) as conn:
        recap = run_roles(conn, [UNINSTALL_ROLE], roles, settings, reporter=reporter, host_name=machine.name,
                          become=conn.endpoint.needs_become)
        if recap.failed:
            raise play_failed(conn, recap, f"uninstalling from {machine.name} failed (nothing removed from the store)")
