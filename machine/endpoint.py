"""Where and as whom a machine is reached over SSH. Its own module: every driver returns one, and the quick
commands (ip, env, ls) that load a driver must not import the SSH client (nor dataclasses: a NamedTuple costs
them nothing)."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from machine.names import LABEL


def is_ip(text: str) -> bool:
    """An IP address without an IPv6 zone (`fe80::1%eth0`): a certificate cannot name one, nor a URL carry it as
    written."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text


def is_dns_name(text: str, wildcard: bool = False) -> bool:
    """A DNS name of hostname labels; with `wildcard`, the first label may be `*` (as certificates allow)."""
    labels = text.removesuffix(".").split(".")
    if wildcard and len(labels) > 1 and labels[0] == "*":
        labels = labels[1:]
    return 0 < len(text) <= 253 and all(LABEL.fullmatch(label) for label in labels)


def is_host(text: str) -> bool:
    """An IP address or a DNS name."""
    return is_ip(text) or is_dns_name(text)


def host_port(host: str, port: int) -> str:
    """HOST:PORT as URLs, docker and messages write it: an IPv6 address in brackets (RFC 3986), or its colons
    would run into the port's."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_of(address: str) -> str:
    """The host of HOST:PORT as host_port (and docker) writes it, out of its IPv6 brackets."""
    return address.rpartition(":")[0].removeprefix("[").removesuffix("]")


def normal_host(name: str) -> str:
    """An IP address in its one canonical form (`2001:DB8::05` is `2001:db8::5`, as a certificate's SANs and
    known_hosts give it back); a DNS name as it is."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


class Endpoint(NamedTuple):
    host: str
    port: int = 22
    user: str = "root"
    name: str = ""  # the machine's name, for messages about its files (`web1:/etc/x`, as the user wrote it)

    @property
    def needs_become(self) -> bool:
        """Provisioning needs root: a host reached as another user is provisioned through sudo."""
        return self.user != "root"

    @property
    def where(self) -> str:
        """HOST:PORT, for messages."""
        return host_port(self.host, self.port)

    @property
    def known_hosts_name(self) -> str:
        # OpenSSH's own form: the bare address on port 22 (an IPv6 one too), `[address]:port` on any other.
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"
