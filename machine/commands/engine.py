"""Commands about the machine's container engine: provision, env, config, regenerate-certs, upgrade."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from machine import certs, dockercontext
from machine import provision as plan
from machine.commands.common import connect, load, locked
from machine.drivers.base import Driver, State
from machine.errors import MachineError
from machine.paths import roles_dir
from machine.store import Machine, Store

if TYPE_CHECKING:
    from machine.roles import Recap


def server_pair(machine: Machine) -> certs.Pair:
    return certs.Pair(machine.dir / "server.pem", machine.dir / "server-key.pem")


def _tls_material(store: Store, machine: Machine, driver: Driver, renew: bool) -> tuple[str, str, str]:
    """CA, server cert and key for the machine; the server cert is reissued when it misses a name."""
    ca, client = certs.ensure_ca(store.certs())
    server = server_pair(machine)
    names = {n for n in (*driver.cert_names(), machine.name, *machine.engine.get("tls_san", [])) if n}
    if renew or not server.cert.exists() or not names <= certs.sans_of(server.cert):
        certs.issue_server(ca, server, machine.name, sorted(names))
    # DOCKER_CERT_PATH is the machine directory, laid out as the docker CLI expects.
    for source, target in ((ca.cert, "ca.pem"), (client.cert, "cert.pem"), (client.key, "key.pem")):
        shutil.copyfile(source, machine.dir / target)
    (machine.dir / "key.pem").chmod(0o600)
    return (ca.cert.read_text(), *server.pem())


def run_provisioning(store: Store, machine: Machine, driver: Driver, *, check: bool = False, diff: bool = False,
                     tags: tuple[str, ...] = (), renew_certs: bool = False, extra: dict[str, Any] | None = None,
                     reporter=None) -> Recap:
    """Run the roles on a running machine (the caller holds its lock)."""
    from machine.roles import run_roles  # the executor is the heaviest import; `--no-provision` skips it

    ca_pem, server_cert, server_key = _tls_material(store, machine, driver, renew_certs)
    variables = {**plan.role_vars(machine.engine, ca_pem, server_cert, server_key), **(extra or {})}
    with connect(machine, driver, timeout=30) as conn:
        recap = run_roles(conn, list(plan.ROLES), roles_dir(), variables, check=check, diff=diff,
                          tags=list(tags) or None, reporter=reporter, host_name=machine.name,
                          become=conn.endpoint.needs_become)
    if recap.failed:
        raise MachineError(f"provisioning {machine.name} failed: {recap.failure}")
    if not check:
        machine.state = "ready"
        machine.save()
        dockercontext.save(machine.name, driver.engine_url(), machine.dir)
    return recap


def _provision_running(store: Store, name: str, **kwargs: Any) -> Recap:
    """Run the roles on a running machine, under its lock; broken roles or an unknown tag are refused first."""
    plan.check_roles(kwargs.get("tags", ()))
    with locked(store, name) as (machine, driver):
        if driver.state() != State.RUNNING:
            raise MachineError(f"machine {name!r} is not running (start it with `pymachine start {name}`)")
        return run_provisioning(store, machine, driver, **kwargs)


def provision(store: Store, name: str, *, check: bool = False, diff: bool = False, tags: tuple[str, ...] = (),
              reporter=None) -> Recap:
    return _provision_running(store, name, check=check, diff=diff, tags=tags, reporter=reporter)


def regenerate_certs(store: Store, name: str, reporter=None) -> Recap:
    """Issue a new server certificate (for the machine's current addresses) and restart the engine with it."""
    return _provision_running(store, name, renew_certs=True, reporter=reporter)


def upgrade(store: Store, name: str, reporter=None) -> Recap:
    """Upgrade the engine packages to the newest version the configured source offers."""
    return _provision_running(store, name, extra={"engine_package_state": "latest"}, reporter=reporter)


def _checked_cert_dir(store: Store, name: str) -> tuple[Driver, Path]:
    machine, driver = load(store, name)
    server = server_pair(machine)
    if not server.cert.exists() or not (machine.dir / "cert.pem").exists():
        raise MachineError(f"machine {name!r} has no engine certificates yet (run `pymachine provision {name}`)")
    address = driver.ip()
    if address not in certs.sans_of(server.cert):
        raise MachineError(
            f"the engine certificate of {name!r} does not name its address {address} "
            f"(run `pymachine regenerate-certs {name}`)"
        )
    return driver, machine.dir


def env(store: Store, name: str) -> dict[str, str]:
    """The docker CLI's variables for the machine."""
    driver, cert_dir = _checked_cert_dir(store, name)
    return {
        "DOCKER_TLS_VERIFY": "1",
        "DOCKER_HOST": driver.engine_url(),
        "DOCKER_CERT_PATH": str(cert_dir),
        "DOCKER_MACHINE_NAME": name,
    }


def config(store: Store, name: str) -> list[str]:
    """The docker CLI's TLS flags for the machine."""
    driver, cert_dir = _checked_cert_dir(store, name)
    return [
        "--tlsverify",
        f"--tlscacert={cert_dir / 'ca.pem'}",
        f"--tlscert={cert_dir / 'cert.pem'}",
        f"--tlskey={cert_dir / 'key.pem'}",
        f"-H={driver.engine_url()}",
    ]
