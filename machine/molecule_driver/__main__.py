"""What the driver's create and destroy playbooks run: `python -m machine.molecule_driver create|destroy`, with
the scenario's platforms (JSON) on stdin and molecule's environment (ephemeral directory, instance config)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from machine import commands, failure, ui
from machine.errors import MachineError
from machine.molecule_driver.platforms import check_platforms, scenario_home
from machine.store import Store, file_lock, write_atomic

# Held by a create while it runs, with its PID inside. Killed, molecule leaves the create running (Ansible's worker
# is in a session of its own): it would go on making platforms while, or after, destroy removes them.
_CREATE_LOCK = "molecule-create.lock"
_CREATE_STOP_WAIT = 600.0  # a stopped create first removes the machine it was making


def create(store: Store, platforms: list[dict]) -> None:
    """Make every platform that is not made yet (a rerun after a failure makes only what is missing)."""
    with _creating(store):
        for p in check_platforms(platforms):
            if store.exists(p.name):
                continue
            ui.err(f"{p.name}: creating a {p.driver} machine{' with the engine' if p.engine else ''}")
            commands.create(store, p.name, p.driver, p.options, engine=p.engine, provision=p.engine is not None)


@contextlib.contextmanager
def _creating(store: Store) -> Iterator[None]:
    store.home.mkdir(mode=0o700, parents=True, exist_ok=True)  # as the store makes it: it holds keys
    lock = store.home / _CREATE_LOCK
    with file_lock(lock, timeout=0, what="the scenario's create"):
        lock.write_text(str(os.getpid()))
        try:
            yield
        finally:
            lock.write_text("")  # a PID left in a free lock could be another process's by the next destroy


def _stop_create(store: Store) -> None:
    """Stop a create of the scenario that is still running (SIGTERM: it rolls back the machine it was making), and
    wait until it has."""
    lock = store.home / _CREATE_LOCK
    if not lock.exists():
        return
    deadline, signalled = time.monotonic() + _CREATE_STOP_WAIT, False
    while True:
        with contextlib.suppress(MachineError), file_lock(lock, timeout=0.2, what="the scenario's create"):
            return
        if time.monotonic() > deadline:
            raise MachineError(f"the scenario's create did not stop within {_CREATE_STOP_WAIT:.0f}s")
        pid = lock.read_text().strip()
        if not signalled and pid.isdigit():
            ui.err(f"stopping the create still running (pid {pid})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
            signalled = True


def destroy(store: Store) -> None:
    """Remove every machine of the scenario's home, once no create runs; `rm -f` also finishes what an
    interrupted create left."""
    _stop_create(store)
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
    failure.stop_on_signals()  # SIGTERM (destroy's, a cancelled job's) rolls back the machine being made
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
    except (MachineError, KeyboardInterrupt) as e:
        failure.exit_with(e)
    write_atomic(Path(os.environ["MOLECULE_INSTANCE_CONFIG"]), yaml.safe_dump(config).encode(), 0o600)


if __name__ == "__main__":
    main()
