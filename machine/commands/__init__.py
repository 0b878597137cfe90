"""One function per user command, over the store, a driver and SSH. The CLI only parses and prints;
tests call these directly as well as through the CLI."""

from machine.commands.common import connect, driver_for, load
from machine.commands.engine import config, env, provision, regenerate_certs, upgrade
from machine.commands.inventory import as_yaml_inventory, host_vars, inventory
from machine.commands.machines import create, kill, parse_driver_options, remove_machine, restart, rm, start, stop
from machine.commands.queries import active, describe, inspect, ip, ls, parse_filters, status, url, version
from machine.commands.transfer import scp, ssh

__all__ = [
    "active", "as_yaml_inventory", "config", "connect", "create", "describe", "driver_for", "env",
    "host_vars", "inspect", "inventory", "ip", "kill", "load", "ls", "parse_driver_options", "parse_filters",
    "provision", "regenerate_certs", "remove_machine", "restart", "rm", "scp", "ssh", "start", "status", "stop",
    "upgrade", "url", "version",
]
