"""Commands about the machine's container engine: provision, env, config, regenerate-certs, upgrade."""

from __future__ import annotations

import ipaddress
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from machine import certs, dockercontext, enginecache, ui
from machine import provision as plan
from machine.commands.common import connect, load, locked, play_failed, refuse_half_removed
from machine.drivers.base import Driver, State
from machine.endpoint import host_port
from machine.errors import MachineError
from machine.paths import roles_dir
from machine.store import Machine, Store, write_atomic

if TYPE_CHECKING:
    from machine.roles import Recap


def _tls_material(store: Store, machine: Machine, driver: Driver, renew: bool,
                  check: bool = False) -> tuple[str, dict[str, tuple[str, str]]]:
    """The CA's certificate, and the machine's server certificates and keys (PEM) by what they serve: the engine,
    and its registry when it hosts one. One is reissued when it misses a name or is about to expire, and with
    `renew`; in check mode, into a throwaway place: the run shows the change, and the store keeps the pair the
    machine still serves (`env` goes on matching it). The store's client certificate is reissued when it is about
    to expire (for every command, as `env` would)."""
    ca, client = _store_ca(store)
    names = sorted({n for n in (*driver.cert_names(), machine.name, *machine.engine.get("tls_san", [])) if n})
    pairs = {"engine": certs.server_pair(machine.dir)}
    if machine.engine.get("registry_enabled", False):
        pairs["registry"] = certs.registry_pair(machine.dir)
    pems = {}
    with tempfile.TemporaryDirectory() as scratch:
        for kind, pair in pairs.items():
            if renew or not pair.cert.exists() or not certs.carries(pair.cert, names) or certs.expiring(pair.cert):
                if check:
                    pair = certs.Pair(Path(scratch, f"{kind}.pem"), Path(scratch, f"{kind}-key.pem"))
                certs.issue_server(ca, pair, machine.name, names)
            pems[kind] = pair.pem()
    _copy_client(ca, client, machine.dir)
    return ca.cert.read_text(), pems


def renew_client_cert(store: Store) -> None:
    """Reissue the store's client certificate (docker-machine's `regenerate-certs --client-certs`), from the same
    CA: every engine keeps trusting it, and every machine's copy follows."""
    _store_ca(store, renew_client=True)


def _store_ca(store: Store, renew_client: bool = False) -> tuple[certs.Pair, certs.Pair]:
    """The store's CA and client certificate (certs.ensure_ca); a client certificate reissued (about to end, or
    asked for) or a CA certificate renewed goes at once to every machine of this CA, and to its docker context
    (one imported with docker-machine's CA keeps its own), not at its own next provisioning: `env` never hands
    out the ended one."""
    def share(ca: certs.Pair, client: certs.Pair, shared: bytes) -> None:
        for name in store.names():
            machine_dir = store.machines_dir / name
            if _read(machine_dir / "ca.pem") == shared:
                _copy_client(ca, client, machine_dir)
                dockercontext.refresh(name, machine_dir)

    return certs.ensure_ca(store.certs(), renew_client, reissued=share)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:  # missing; or a machine directory removed meanwhile
        return None


def _copy_client(ca: certs.Pair, client: certs.Pair, machine_dir: Path) -> None:
    """DOCKER_CERT_PATH is the machine directory, laid out as the docker CLI expects (written when they differ: a
    fleet's no-op run would otherwise rewrite three files per machine)."""
    for source, target, mode in ((ca.cert, "ca.pem", 0o644), (client.cert, "cert.pem", 0o644),
                                 (client.key, "key.pem", 0o600)):
        data, dest = source.read_bytes(), machine_dir / target
        if not dest.is_file() or dest.read_bytes() != data or dest.stat().st_mode & 0o777 != mode:
            write_atomic(dest, data, mode)


def run_provisioning(store: Store, machine: Machine, driver: Driver, *, check: bool = False, diff: bool = False,
                     tags: tuple[str, ...] = (), renew_certs: bool = False, extra: dict[str, Any] | None = None,
                     reporter=None, roles: Sequence[str] = (), roles_path: Sequence[Path] = ()) -> Recap:
    """Run the roles on a running machine (the caller holds its lock); `roles`, found in `roles_path`, run after
    the engine's in the same play (one connection, one fact gathering, one recap)."""
    from machine.roles import run_roles  # the executor is the heaviest import; `--no-provision` skips it

    ca_pem, pems = _tls_material(store, machine, driver, renew_certs, check)
    variables = {**plan.role_vars(machine.engine, ca_pem, *pems["engine"]),
                 **_registry_vars(store, machine, driver, pems.get("registry")), **(extra or {})}
    with connect(machine, driver, timeout=30) as conn:
        recap = run_roles(conn, list(plan.ROLES), roles_dir(), variables, check=check, diff=diff,
                          tags=list(tags) or None, reporter=reporter, host_name=machine.name,
                          become=conn.endpoint.needs_become, more=[(roles, roles_path)] if roles else ())
        if recap.failed:
            raise play_failed(conn, recap, f"provisioning {machine.name} failed")
    if not check:
        machine.state = "ready"
        machine.save()
        dockercontext.save(machine.name, driver.engine_url(), machine.dir)
    return recap


def _provision_running(store: Store, name: str, add_registry: bool = False, **kwargs: Any) -> Recap:
    """Run the roles on a running machine, under its lock; broken roles or an unknown tag are refused first.
    When the machine's registry is new or now has other addresses (its certificate was issued again for them),
    every other machine of the store is made to trust it there."""
    plan.check_roles(kwargs.get("tags", ()))
    with locked(store, name) as (machine, driver):
        refuse_half_removed(machine)
        if driver.state() != State.RUNNING:
            raise driver.not_running()
        if add_registry:
            machine.engine["registry_enabled"] = True  # recorded by a successful run, so later ones keep it
        before = _registry_addresses(machine)
        recap = run_provisioning(store, machine, driver, **kwargs)
        moved = _registry_addresses(machine) != before
    if (add_registry or moved) and not kwargs.get("check"):
        share_registries(store, name)
    return recap


def provision(store: Store, name: str, *, check: bool = False, diff: bool = False, tags: tuple[str, ...] = (),
              registry: bool = False, reporter=None) -> Recap:
    """Run the roles again; with `registry`, the machine also runs a registry from now on, and every other
    machine of the store is made to trust it."""
    return _provision_running(store, name, add_registry=registry, check=check, diff=diff, tags=tags,
                              reporter=reporter)


# -- registries --------------------------------------------------------------------------------------------
def _registry_address(host: str) -> str:
    """HOST:PORT as an image name carries it (an IPv6 address in brackets)."""
    return host_port(host, plan.REGISTRY_PORT)


def _registry_addresses(machine: Machine) -> set[str]:
    """HOST:PORT for each name the machine's registry certificate carries (but loopback, each machine's own)."""
    cert = certs.registry_pair(machine.dir).cert
    if not machine.engine.get("registry_enabled") or not cert.exists():
        return set()
    return {_registry_address(host) for host in certs.sans_of(cert) - {"localhost", "127.0.0.1"}}


def trusted_registries(store: Store, current: Machine | None = None) -> list[str]:
    """Every registry of the store; `current` as it is now (its record is saved once its provisioning is done)."""
    found = _registry_addresses(current) if current else set()
    for name in store.names():
        if current and name == current.name:
            continue
        try:
            found |= _registry_addresses(store.load(name))
        except MachineError:
            continue  # a damaged record: `ls` shows it; its registry is trusted again once it is provisioned
    return sorted(found)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a DNS name (an adopted host's), or no address yet
        return False


def _registry_vars(store: Store, machine: Machine, driver: Driver, tls: tuple[str, str] | None) -> dict[str, Any]:
    """The registry role's variables: the registries to trust and, on a registry's machine, its certificate and
    key (`tls`)."""
    if machine.engine.get("registry_enabled"):
        address = driver.ip() or ""
        if _is_loopback(address):
            raise MachineError(f"{machine.name} is reached through ports forwarded on {address}: a registry on it "
                               f"would be out of the other machines' reach (give it a network of its own)")
    return plan.registry_vars(trusted_registries(store, machine), tls)


def share_registries(store: Store, registry: str) -> None:
    """Make every other provisioned, running machine trust the store's registries (`registry`'s, just added,
    among them). A machine that cannot be reached now is named: its next provisioning installs the trust."""
    from machine.roles import run_roles

    ca_pem = _store_ca(store)[0].cert.read_text()
    trusted = trusted_registries(store)
    for name in store.names():
        if name == registry:
            continue
        try:
            with locked(store, name) as (machine, driver):
                if machine.state != "ready" or not certs.server_pair(machine.dir).cert.exists():
                    continue  # no engine yet: its provisioning lists the store's registries then
                if driver.state() != State.RUNNING:
                    raise MachineError("it is not running")
                variables = {"engine": machine.engine.get("engine", "docker"), "tls_ca_cert": ca_pem,
                             **plan.registry_vars(trusted)}
                with connect(machine, driver, timeout=30) as conn:
                    recap = run_roles(conn, ["registry"], roles_dir(), variables, host_name=name,
                                      become=conn.endpoint.needs_become)
                    if recap.failed:
                        raise play_failed(conn, recap, "its registry role failed")
        except MachineError as e:
            ui.err(f"warning: {name} does not trust the registry of {registry} yet ({e}): "
                   f"`pymachine provision {name}` makes it")


def regenerate_certs(store: Store, name: str, reporter=None) -> Recap:
    """Issue a new server certificate (for the machine's current addresses) and restart the engine with it."""
    return _provision_running(store, name, renew_certs=True, reporter=reporter)


def upgrade(store: Store, name: str, reporter=None) -> Recap:
    """Upgrade the engine packages to the newest version the configured source offers; a driver that prepares
    them ahead (the engine cache) then checks its prepared set against the archive, for the next machines."""
    recap = _provision_running(store, name, extra={"engine_package_state": "latest"}, reporter=reporter)
    machine, driver = load(store, name)
    packages = enginecache.package_set(machine.engine)
    if packages is not None and isinstance(driver, enginecache.PreparesPackages):
        driver.refresh_packages(packages)
    return recap
