"""One function per user command, over the store, a driver and SSH. The CLI only parses and prints;
tests call these directly as well as through the CLI.

Each name is imported from its module on first use: a quick command (`ip`, `env`, `ls`) then pays only for what
it runs, not for SSH, the certificate machinery and the role engine the others need."""

from __future__ import annotations

import importlib
from typing import Any

# No function may be named like a module of this package: importing a submodule sets the package's attribute of
# its name to the module.
_SUBMODULES = {"apply", "swarm"}  # used as modules: `commands.swarm.join(...)`
_MODULES = {
    "apply": "apply", "swarm": "swarm",
    "connect": "common", "driver_for": "common", "load": "common",
    "provision": "engine", "regenerate_certs": "engine", "renew_client_cert": "engine", "share_registries": "engine",
    "upgrade": "engine",
    "prune_cache": "cache",
    "as_yaml_inventory": "ansible_inventory", "host_vars": "ansible_inventory", "inventory": "ansible_inventory",
    "create": "machines", "kill": "machines", "parse_driver_options": "machines", "remove_machine": "machines",
    "restart": "machines", "rm": "machines", "start": "machines", "stop": "machines",
    "SAMPLE_ROW": "queries", "active": "queries", "config": "queries", "describe": "queries",
    "docker_machine_host": "queries", "engine_version": "queries",
    "env": "queries", "inspect": "queries", "ip": "queries", "ls": "queries",
    "machine_fields": "queries", "parse_filters": "queries", "status": "queries", "url": "queries",
    "version": "queries",
    "mount": "transfer", "scp": "transfer", "ssh": "transfer",
}

__all__ = sorted(_MODULES)


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    value = module if name in _SUBMODULES else getattr(module, name)
    globals()[name] = value
    return value
