"""One function per user command, over the store, a driver and SSH. The CLI only parses and prints;
tests call these directly as well as through the CLI."""

from machine.commands import apply, swarm
from machine.commands.common import connect, driver_for, load
from machine.commands.engine import config, env, provision, regenerate_certs, share_registries, upgrade
from machine.commands.inventory import as_yaml_inventory, host_vars, inventory
from machine.commands.machines import create, kill, parse_driver_options, remove_machine, restart, rm, start, stop
from machine.commands.queries import (
    SAMPLE_ROW,
    active,
    describe,
    docker_machine_host,
    inspect,
    ip,
    ls,
    machine_fields,
    parse_filters,
    status,
    url,
    version,
)
from machine.commands.transfer import scp, ssh

__all__ = [
    "SAMPLE_ROW", "active", "apply", "as_yaml_inventory", "config", "connect", "create", "describe",
    "docker_machine_host", "driver_for", "env", "host_vars", "inspect", "inventory", "ip", "kill", "load", "ls",
    "machine_fields", "parse_driver_options", "parse_filters",
    "provision", "regenerate_certs", "remove_machine", "restart", "rm", "scp", "share_registries", "ssh",
    "start", "status", "stop", "swarm", "upgrade", "url", "version",
]
