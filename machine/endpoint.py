"""Where and as whom a machine is reached over SSH. Its own module: every driver returns one, and the quick
commands (ip, env, ls) that load a driver must not import the SSH client (nor dataclasses: a NamedTuple costs
them nothing)."""

from __future__ import annotations

from typing import NamedTuple


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
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"
