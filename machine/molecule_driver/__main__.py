"""What the driver's create and destroy playbooks run: `python -m machine.molecule_driver create|destroy`, with
the scenario's platforms (JSON) on stdin and molecule's environment (ephemeral directory, instance config)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from machine import commands, ui
from machine.errors import MachineError
from machine.molecule_driver.platforms import check_platforms, scenario_home
from machine.store import Store, write_atomic


def create(store: Store, platforms: list[dict]) -> None:
    """Make every platform that is not made yet (a rerun after a failure makes only what is missing)."""
    for p in check_platforms(platforms):
        if store.exists(p.name):
            continue
        ui.err(f"{p.name}: creating a {p.driver} machine{' with the engine' if p.engine else ''}")
        commands.create(store, p.name, p.driver, p.options, engine=p.engine, provision=p.engine is not None)


def destroy(store: Store) -> None:
    """Remove every machine of the scenario's home; `rm -f` also finishes what an interrupted create left."""
    failed = []
    for name in store.names():
        ui.err(f"{name}: removing")
        try:
            commands.rm(store, name, force=True)
        except MachineError as e:
            failed.append(f"{name}: {e}")
    if failed:
        raise MachineError("; ".join(failed))


def instance_config(store: Store) -> list[dict]:
    """Molecule's record of the instances (for `molecule login` and its status)."""
    config = []
    for name in store.names():
        hostvars = commands.host_vars(store, name)
        config.append({"instance": name, "address": hostvars["ansible_host"], "user": hostvars["ansible_user"],
                       "port": hostvars["ansible_port"], "identity_file": hostvars["ansible_ssh_private_key_file"]})
    return config


def main() -> None:
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    store = Store(scenario_home(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]))
    try:
        if action == "create":
            create(store, json.load(sys.stdin))
            config = instance_config(store)
        elif action == "destroy":
            destroy(store)
            config = []
        else:
            raise SystemExit("usage: python -m machine.molecule_driver create|destroy")
    except MachineError as e:
        ui.err(f"error: {e}")
        raise SystemExit(e.exit_code) from None
    write_atomic(Path(os.environ["MOLECULE_INSTANCE_CONFIG"]), yaml.safe_dump(config).encode(), 0o600)


if __name__ == "__main__":
    main()
