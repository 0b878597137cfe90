"""The host bridge that local machines plug into, its NAPT rules, and the address leases on it.

Leases are host-wide (one JSON file per bridge under /var/lib/pymachine/networks, guarded by a lock),
because a bridge is shared by every pymachine home on the host. The bridge and its rules exist exactly as
long as at least one lease does: the last `rm` takes them away. A bridge pymachine makes carries the MAC derived
from its name; an interface of that name without it is the host's own (br0, virbr0, docker0), never used, never
taken away.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from machine.drivers.local import leases as host_leases
from machine.errors import MachineError, UsageError

STATE_DIR = Path(os.environ.get("PYMACHINE_NETWORK_STATE", "/var/lib/pymachine/networks"))
_BRIDGE_NAME = re.compile(r"[a-zA-Z0-9_-]{1,15}")
SYS_NET = Path("/sys/class/net")


@dataclass(frozen=True)
class Network:
    bridge: str
    subnet: ipaddress.IPv4Network

    @classmethod
    def parse(cls, bridge: str, subnet: str) -> Network:
        if not _BRIDGE_NAME.fullmatch(bridge):
            raise UsageError(f"--local-bridge: {bridge!r} is not an interface name (1-15 of a-z 0-9 _ -)")
        try:
            net = ipaddress.IPv4Network(subnet, strict=True)
        except ValueError as e:
            raise UsageError(f"--local-subnet: {e}") from None
        if net.prefixlen > 29:
            raise UsageError(f"--local-subnet: {subnet} is too small (use /29 or larger)")
        return cls(bridge, net)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return next(self.subnet.hosts())

    @property
    def comment(self) -> str:
        return f"pymachine:{self.bridge}"

    @property
    def mac(self) -> str:
        """A locally administered unicast MAC derived from the bridge name, the same on every host."""
        digest = hashlib.sha256(self.bridge.encode()).digest()[:5]
        return ":".join(f"{b:02x}" for b in (0x02, *digest))

    def check_free(self) -> None:
        """Refuse a bridge name the host already uses for an interface pymachine did not make."""
        if self._taken():
            raise UsageError(f"--local-bridge {self.bridge}: the host's interface {self.bridge} was not made by "
                             f"pymachine; choose another name")

    def _taken(self) -> bool:
        link = SYS_NET / self.bridge
        try:
            mac = (link / "address").read_text().strip()
            # The device type, not the `bridge` directory: the kernel adds that directory a moment after the
            # link appears, and a parallel create that looked in between took pymachine's new bridge for foreign.
            kind = (link / "uevent").read_text().splitlines()
        except FileNotFoundError:
            return False  # no such interface (or one being removed): the first lease makes it
        return mac != self.mac or "DEVTYPE=bridge" not in kind

    @property
    def _state_file(self) -> Path:
        return STATE_DIR / f"{self.bridge}.json"

    @contextlib.contextmanager
    def _leases(self) -> Iterator[dict[str, str]]:
        """The bridge's leases ({address: owner}) under the lock; saved when the block ends."""
        meta = {"subnet": str(self.subnet)}
        with host_leases.table(self._state_file, f"bridge {self.bridge}", meta) as (state, held):
            if state and state["subnet"] != str(self.subnet):
                raise UsageError(
                    f"bridge {self.bridge} already serves {state['subnet']}; use that --local-subnet "
                    f"or another --local-bridge"
                )
            yield held

    def lease(self, owner: str, wanted: str | None = None) -> str:
        """Give `owner` (a machine directory) an address, keeping `wanted` when it is still its own."""
        with self._leases() as leases:  # under the lock: no other pymachine is making or removing the bridge
            self.check_free()
            _forget_orphans(leases, owner)
            if wanted and leases.get(wanted, owner) == owner:
                leases[wanted] = owner
                address = wanted
            else:
                taken = {*leases, str(self.gateway)}
                free = (str(a) for a in self.subnet.hosts() if str(a) not in taken)
                address = next(free, None)
                if address is None:
                    raise MachineError(f"no free address left in {self.subnet} on bridge {self.bridge}")
                leases[address] = owner
            self._bring_up()
            self._forget_neighbour(address)
            return address

    def leased_to(self, owner: str) -> str | None:
        """The address `owner` holds on this bridge, if any (a report, not a decision)."""
        return host_leases.held_by(self._state_file, owner)

    def release(self, owner: str) -> None:
        """Drop `owner`'s lease; the last one out takes the bridge and its rules with it."""
        with self._leases() as leases:
            _forget_orphans(leases, owner)
            for addr in [a for a, who in leases.items() if who == owner]:
                del leases[addr]
                if _link_exists(self.bridge):
                    self._forget_neighbour(addr)
            if not leases:
                self._tear_down()

    # -- host plumbing -------------------------------------------------------------------------------------
    def _rules(self) -> list[tuple[str, str, list[str]]]:
        """(table, chain, rule) for NAPT out of the subnet and forwarding to and from the bridge."""
        tag = ["-m", "comment", "--comment", self.comment]
        return [
            ("nat", "POSTROUTING", ["-s", str(self.subnet), "!", "-o", self.bridge, *tag, "-j", "MASQUERADE"]),
            ("filter", "FORWARD", ["-i", self.bridge, *tag, "-j", "ACCEPT"]),
            ("filter", "FORWARD", ["-o", self.bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
                                   *tag, "-j", "ACCEPT"]),
        ]

    def _bring_up(self) -> None:
        if not _link_exists(self.bridge):
            self._check_overlap()
            # A fixed address: a bridge otherwise takes its lowest port's MAC, and each change of it makes
            # the host forget every machine's MAC and the machines lose their gateway's.
            _run("ip", "link", "add", self.bridge, "address", self.mac, "type", "bridge")
            _run("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for table, chain, spec in self._rules():
            if not _iptables("-t", table, "-C", chain, *spec, check=False):
                # Insert first: a host running Docker sets the FORWARD policy to DROP.
                _iptables("-t", table, "-I", chain, "1", *spec)
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")

    def _forget_neighbour(self, address: str) -> None:
        # The host keeps a dead machine's MAC as REACHABLE for up to 45 s and then probes it for 8 s more:
        # a new machine on a reused address would be unreachable that long.
        _run("ip", "neigh", "flush", "to", address, "dev", self.bridge)

    def _tear_down(self) -> None:
        for table, chain, spec in self._rules():
            while _iptables("-t", table, "-C", chain, *spec, check=False):
                _iptables("-t", table, "-D", chain, *spec)
        if _link_exists(self.bridge) and not self._taken():
            _run("ip", "link", "del", self.bridge)

    def _check_overlap(self) -> None:
        routes = json.loads(_run("ip", "-j", "-4", "route", "show"))
        for route in routes:
            dst = route.get("dst", "")
            if dst in ("default", "") or route.get("dev") == self.bridge:
                continue
            with contextlib.suppress(ValueError):
                if ipaddress.IPv4Network(dst, strict=False).overlaps(self.subnet):
                    raise UsageError(
                        f"--local-subnet {self.subnet} overlaps the host route {dst} on {route.get('dev')}; "
                        f"choose another subnet"
                    )


def _forget_orphans(leases: dict[str, str], owner: str) -> None:
    """Drop leases of other owners whose machine directory is gone (a home deleted by hand), so that they
    neither hold addresses nor keep the bridge up after the last real machine's `rm`."""
    for addr, who in list(leases.items()):
        if who != owner and not Path(who).is_dir():
            del leases[addr]


def _link_exists(name: str) -> bool:
    return (SYS_NET / name).exists()


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MachineError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip()}")
    return proc.stdout


def _iptables(*args: str, check: bool = True) -> bool:
    proc = subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise MachineError(f"`iptables {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.returncode == 0


def host_nameservers() -> list[str]:
    """The host's resolvers that a machine in its own network namespace can also reach."""
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return []
    servers = [line.split()[1] for line in lines if line.startswith("nameserver") and len(line.split()) > 1]
    return [s for s in servers if not ipaddress.ip_address(s.split("%")[0]).is_loopback]
