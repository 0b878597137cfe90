"""pymachine as a molecule driver: any role's scenario says `driver: {name: molecule-pymachine}` and its
platforms become pymachine machines (local system containers by default; libvirt VMs, EC2 instances or adopted
SSH hosts on request). Registered through molecule's `molecule.driver` entry point by `pymachine[molecule]`.

Molecule's schema accepts only its own driver names and `molecule-*`/`custom-*`, hence the prefixed name.
The machines live in a pymachine home of the scenario's own (in molecule's ephemeral directory), so platform
names never collide with the user's machines; the image cache is the user's, so the base is built once."""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

from molecule.api import Driver
from molecule.util import sysexit_with_message

from machine.errors import MachineError
from machine.molecule_driver.platforms import check_platforms, scenario_home


class PymachineDriver(Driver):
    title = "pymachine machines: local system containers, libvirt VMs, EC2 instances, SSH hosts"
    name = "molecule-pymachine"

    def __init__(self, config: Any = None) -> None:
        # Not super().__init__(): molecule looks up the version of the distribution named like the driver's
        # top-level package, and pymachine's package (`machine`) is not named like its distribution.
        self._config = config
        self._path = str(Path(__file__).parent)
        self.module = "pymachine"
        self.version = version("pymachine")

    @property
    def login_cmd_template(self) -> str:
        return "env PYMACHINE_HOME={home} pymachine ssh {instance}"

    @property
    def default_ssh_connection_options(self) -> list[str]:
        # Each machine's pinned host key is in its own host variables (ansible_connection_options).
        return []

    @property
    def default_safe_files(self) -> list[str]:
        return [str(self._home())]

    def login_options(self, instance_name: str) -> dict[str, str]:
        return {"instance": instance_name, "home": str(self._home())}

    def ansible_connection_options(self, instance_name: str) -> dict[str, Any]:
        """How Ansible reaches a made machine: the variables `pymachine inventory` gives it."""
        from machine import commands
        from machine.store import Store

        store = Store(self._home())
        if not store.exists(instance_name):
            return {}
        try:
            return commands.host_vars(store, instance_name)
        except MachineError:
            return {}  # not reachable (yet): molecule asks before create too

    def sanity_checks(self) -> None:
        """Refuse a platform pymachine cannot make before molecule runs anything: one line, nothing made."""
        if self._config.action == "destroy":
            return  # it removes every machine of the scenario, whatever the platforms say now
        try:
            check_platforms(self._config.config_data["platforms"])
        except MachineError as e:
            sysexit_with_message(f"molecule-pymachine: {e}")

    def _home(self) -> Path:
        return scenario_home(self._config.scenario.ephemeral_directory if self._config else os.getcwd())
