"""How the host reaches a guest: loopback ports forwarded by QEMU, or a DHCP lease on a libvirt network."""

from __future__ import annotations

import contextlib
import random
import socket
import time
from collections.abc import Callable, Set
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


Lease = tuple[str, int]  # (IPv4 address, expiry time)


def leases(net: libvirt.virNetwork, mac: str) -> set[Lease]:
    """The IPv4 leases the network's DHCP server holds for `mac`."""
    return {(x["ipaddr"], x.get("expirytime", 0)) for x in net.DHCPLeases(mac)
            if x.get("type") == 0 and x.get("ipaddr")}  # type 0: IPv4


def lease(net: libvirt.virNetwork, mac: str, stale: Set[Lease] = frozenset()) -> str | None:
    """The address of the newest lease of `mac` that is not among `stale` (the leases held before a boot).

    A guest that was killed never released its lease, and a new boot may be given another address (a
    reservation changed): only a lease granted or renewed since the boot tells where the guest is now.
    A lease that never expires (expiry 0) is never renewed, and never moves: it always counts.
    """
    fresh = [x for x in leases(net, mac) if x not in stale or x[1] == 0]
    return max(fresh, key=lambda x: x[1])[0] if fresh else None


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


def wait_for_lease(net: libvirt.virNetwork, mac: str, stale: Set[Lease], timeout: float,
                   is_alive: Callable[[], bool]) -> str:
    deadline = time.monotonic() + timeout
    while True:
        address = lease(net, mac, stale)
        if address:
            return address
        if not is_alive():
            raise MachineError(f"the guest with MAC {mac} stopped before it got an address")
        if time.monotonic() > deadline:
            raise MachineError(f"no DHCP lease for MAC {mac} on network {net.name()} within {timeout:.0f}s")
        time.sleep(0.5)
