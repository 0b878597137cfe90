"""`pymachine import`: adopt the machines docker-machine made, as generic machines, from its store
($MACHINE_STORAGE_PATH, by default ~/.docker/machine: `machines/NAME/config.json`, the machine's SSH key and its
engine certificates). The engine keeps its certificates (docker-machine's CA), so the user's docker CLI keeps
working through `pymachine env`; with `regenerate_certs`, pymachine provisions the host and issues its own."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from machine import provision as plan
from machine import ui
from machine.commands.common import locked
from machine.commands.engine import regenerate_certs
from machine.commands.machines import create, remove_machine
from machine.errors import MachineError, UsageError
from machine.store import Store

# What `pymachine env` needs in the machine's directory: docker-machine keeps the same files under the same names.
CERT_FILES = ("ca.pem", "cert.pem", "key.pem", "server.pem", "server-key.pem")


def default_store() -> Path:
    return Path(os.environ.get("MACHINE_STORAGE_PATH") or Path.home() / ".docker" / "machine")


def read_host(dm_store: Path, name: str) -> dict[str, Any]:
    """docker-machine's record of one machine, or UsageError when the store or the record is not docker-machine's."""
    path = dm_store / "machines" / name / "config.json"
    try:
        host = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{dm_store} has no docker-machine machine {name!r} (no {path})") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not docker-machine's config.json ({e})") from None
    driver = host.get("Driver") if isinstance(host, dict) else None
    if not isinstance(driver, dict) or not isinstance(host.get("HostOptions"), dict) or "DriverName" not in host:
        raise UsageError(f"{path}: not docker-machine's config.json (no Driver, DriverName and HostOptions)")
    if not driver.get("IPAddress"):
        raise UsageError(f"{path}: docker-machine recorded no IP address for {name!r}")
    return host


# docker-machine's drivers whose SSH is a NAT port forward on the user's host (VirtualBox's: `--natpf1
# ssh,tcp,127.0.0.1,SSHPort,,22`; GetSSHHostname is 127.0.0.1), while the engine is at IPAddress:2376 (the host-only
# adapter's address, which the user's host reaches).
_SSH_ON_LOOPBACK = {"virtualbox"}


def generic_options(dm_store: Path, name: str, host: dict[str, Any]) -> dict[str, Any]:
    """The generic driver's options for the host: where its SSH and its engine are, SSH user, port and key."""
    driver = host["Driver"]
    key = Path(driver.get("SSHKeyPath") or "")
    if not key.is_file():  # a store that was moved: the key is beside the record
        key = dm_store / "machines" / name / "id_rsa"
    address = str(driver["IPAddress"])
    forwarded = host["DriverName"] in _SSH_ON_LOOPBACK
    return {
        "generic_ip_address": "127.0.0.1" if forwarded else address,
        "generic_engine_address": address if forwarded else None,
        "generic_ssh_user": str(driver.get("SSHUser") or "root"),
        "generic_ssh_port": str(driver.get("SSHPort") or 22),
        "generic_ssh_key": str(key),
    }


def engine_options(host: dict[str, Any], install: str) -> dict[str, Any]:
    """docker-machine's engine options as pymachine's, so that a later `provision` keeps them."""
    options = host["HostOptions"].get("EngineOptions") or {}
    storage = options.get("StorageDriver") or "overlay2"
    return plan.engine_config(
        install=install, storage_driver=storage if storage in plan.STORAGE_DRIVERS else "overlay2",
        labels=tuple(options.get("Labels") or ()), env=tuple(options.get("Env") or ()),
        insecure_registries=tuple(options.get("InsecureRegistry") or ()),
        registry_mirrors=tuple(options.get("RegistryMirror") or ()),
    )


def import_machine(store: Store, dm_store: Path, name: str, regenerate: bool = False,
                   install: str = "official") -> None:
    """Adopt docker-machine's `name` under the same name; nothing is written when its record is unusable."""
    host = read_host(dm_store, name)
    source = dm_store / "machines" / name
    missing = [f for f in CERT_FILES if not (source / f).is_file()]
    if missing and not regenerate:
        raise UsageError(f"{source} lacks {', '.join(missing)}: import it with --regenerate-certs")
    machine = create(store, name, "generic", generic_options(dm_store, name, host),
                     engine=engine_options(host, install), provision=False)
    if regenerate:
        try:
            regenerate_certs(store, name)
        except BaseException as e:
            # The record was saved ready, with certificates its engine never got: `env` would hand them out and
            # a second import would find the name taken. Forgotten instead; the host is left as it is.
            _forget(store, name)
            if isinstance(e, MachineError):
                raise MachineError(f"not imported: provisioning it for --regenerate-certs failed ({e}); "
                                   f"import it again once that is fixed") from None
            raise
        return
    for file in CERT_FILES:
        shutil.copyfile(source / file, machine.dir / file)
    for file in ("key.pem", "server-key.pem"):
        (machine.dir / file).chmod(0o600)


def _forget(store: Store, name: str) -> None:
    """Undo the import of `name`: only pymachine's record goes (a generic machine's removal never touches its host).
    A failed undo is reported; the import's own error is the one raised."""
    try:
        with locked(store, name) as (machine, driver):
            remove_machine(store, machine, driver, force=True)
    except Exception as e:
        ui.err(f"warning: forgetting the half-imported {name} failed: {e} (`pymachine rm -f {name}` removes it)")
