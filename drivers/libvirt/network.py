"""How the host reaches a guest: loopback ports forwarded by QEMU, or a DHCP lease on a libvirt network."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from machine.errors import MachineError

if TYPE_CHECKING:
    import libvirt

LOOPBACK = "127.0.0.1"
USER = "user"


def free_ports(count: int) -> list[int]:
    """Loopback TCP ports nothing listens on now (all held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def new_mac() -> str:
    # 52:54:00 is QEMU's prefix for locally administered guest NICs.
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


def lease(net: libvirt.virNetwork, mac: str) -> str | None:
    """The IPv4 address the network's DHCP server leased to `mac` most recently."""
    leases = [x for x in net.DHCPLeases(mac) if x.get("type") == 0 and x.get("ipaddr")]  # 0: IPv4
    if not leases:
        return None
    return max(leases, key=lambda x: x.get("expirytime", 0))["ipaddr"]


def wait_for_ssh(host: str, port: int, timeout: float, is_alive: Callable[[], bool]) -> None:
    """Wait until an SSH server greets on host:port.

    QEMU's forwarder accepts a connection before the guest listens (and resets it after), and a TCG boot can
    take longer than a generic SSH wait allows: the driver waits for the banner itself, quietly.
    """
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=3) as sock:
            if sock.recv(4).startswith(b"SSH-"):
                return
        if not is_alive():
            raise MachineError(f"the guest stopped before its SSH server answered on {host}:{port}")
        if time.monotonic() > deadline:
            raise MachineError(f"no SSH server answered on {host}:{port} within {timeout:.0f}s")
        time.sleep(0.2)


def wait_for_lease(net: libvirt.virNetwork, mac: str, timeout: float, is_alive: Callable[[], bool]) -> str:
    deadline = time.monotonic() + timeout
    while True:
        address = lease(net, mac)
        if address:
            return address
        if not is_alive():
            raise MachineError(f"the guest with MAC {mac} stopped before it got an address")
        if time.monotonic() > deadline:
            raise MachineError(f"no DHCP lease for MAC {mac} on network {net.name()} within {timeout:.0f}s")
        time.sleep(0.5)
