"""`pymachine inventory`: the machines as an Ansible inventory (static YAML, or a dynamic inventory script)."""

from __future__ import annotations

import shlex
from typing import Any

from machine import ui
from machine.commands.common import load
from machine.errors import MachineError
from machine.store import Store


def host_vars(store: Store, name: str) -> dict[str, Any]:
    """How Ansible reaches one machine: the same key, user, port and pinned host key pymachine uses."""
    machine, driver = load(store, name)
    endpoint = driver.ssh_endpoint()
    ssh_args = ["-o", f"UserKnownHostsFile={machine.known_hosts_path}", "-o", "StrictHostKeyChecking=yes",
                "-o", "IdentitiesOnly=yes"]
    return {
        "ansible_host": endpoint.host,
        "ansible_port": endpoint.port,
        "ansible_user": endpoint.user,
        "ansible_ssh_private_key_file": str(machine.key_path),
        "ansible_ssh_common_args": shlex.join(ssh_args),
        "ansible_python_interpreter": "auto_silent",
        "pymachine_driver": machine.driver,
        **({"ansible_become": True} if endpoint.needs_become else {}),
    }


def inventory(store: Store) -> dict[str, Any]:
    """{group: {"hosts": [...]}} with a group per driver, and every host's variables under _meta."""
    hostvars: dict[str, dict[str, Any]] = {}
    for name in store.names():
        try:
            if load(store, name)[1].ip():
                hostvars[name] = host_vars(store, name)
        except MachineError as e:  # one broken machine must not take the whole inventory down
            ui.err(f"warning: {e}")
    groups: dict[str, list[str]] = {}
    for name, variables in hostvars.items():
        groups.setdefault(f"pymachine_{variables['pymachine_driver']}", []).append(name)
    return {
        "_meta": {"hostvars": hostvars},
        "all": {"hosts": sorted(hostvars), "children": sorted(groups)},
        **{group: {"hosts": hosts} for group, hosts in sorted(groups.items())},
    }


def as_yaml_inventory(dynamic: dict[str, Any]) -> dict[str, Any]:
    """The same inventory in the static YAML layout (`all: hosts: … children: …`)."""
    hostvars = dynamic["_meta"]["hostvars"]
    children = {group: {"hosts": dict.fromkeys(dynamic[group]["hosts"])} for group in dynamic["all"]["children"]}
    return {"all": {"hosts": hostvars, "children": children}}
