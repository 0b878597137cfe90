"""The small interface every driver implements. Drivers make hosts; they know nothing about provisioning."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple

from machine.endpoint import Endpoint, host_port
from machine.errors import MachineError, UsageError
from machine.store import Machine, Store


class State(StrEnum):
    RUNNING = "Running"
    STOPPED = "Stopped"
    STARTING = "Starting"
    ERROR = "Error"


class Option(NamedTuple):
    """A driver flag: `--{name}` on the command line, `PYMACHINE_{NAME}` (or `env_alias`) in the environment.
    (A NamedTuple, as Endpoint: the quick commands load every driver's options, and dataclasses would cost them
    more than the rest of this module.)"""

    name: str
    help: str
    default: Any = None
    type: type = str
    choices: tuple[str, ...] = ()
    multiple: bool = False  # a repeatable flag; comma-separated in the environment; parsed to a list
    env_alias: str | None = None  # a variable users already set for the same thing (AWS_DEFAULT_REGION)
    secret: bool = False  # used by the command that is given it, never written to the store

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "PYMACHINE_" + self.key.upper()

    def parse(self, raw: Any) -> Any:
        """Turn a flag or environment value into this option's type, or raise UsageError."""
        where = f"--{self.name}"
        if raw is None or raw == ():  # not on the command line (click gives () for a repeatable flag)
            raw = None
            variable = next((v for v in (self.env, self.env_alias) if v and v in os.environ), None)
            if variable:
                raw, where = os.environ[variable], variable  # name what the user set, not a flag never typed
        if raw is None:
            raw = self.default
        if not self.multiple:
            return None if raw is None else self._one(raw, where)
        items = raw.split(",") if isinstance(raw, str) else list(raw or ())
        return [self._one(item, where) for item in items if item != ""]

    def _one(self, raw: Any, where: str) -> Any:
        try:
            value = _BOOL[str(raw).lower()] if self.type is bool else self.type(raw)
        except (ValueError, KeyError):
            raise UsageError(f"{where}: {raw!r} is not a valid {self.type.__name__}") from None
        if self.choices and value not in self.choices:
            raise UsageError(f"{where}: {raw!r} is not one of {', '.join(self.choices)}")
        return value


def each_step(*steps: Callable[[], None]) -> None:
    """Run every step even when one fails (what `remove()` needs: a failed step must not keep the next from
    removing what it can), then raise one MachineError naming each failure."""
    errors = []
    for step in steps:
        try:
            step()
        except MachineError as e:
            errors.append(str(e))
    if errors:
        raise MachineError("; ".join(errors))


_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


ENGINE_PORT = 2376


class Pruned(NamedTuple):
    """Something of a driver's cache that `pymachine cache prune` removed (or would): what, and its bytes."""

    what: str
    size: int


class Driver(ABC):
    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    # Who pymachine logs in as; provisioning escalates with sudo (Ansible's become) when it is not root.
    ssh_user: str = "root"
    # Whether pymachine makes the machine's key pair, or the user brings one (an adopted host).
    makes_key: ClassVar[bool] = True

    def __init__(self, machine: Machine, store: Store, secrets: dict[str, Any] | None = None) -> None:
        self.machine = machine
        self.store = store
        self._secrets = secrets

    @property
    def opts(self) -> dict[str, Any]:
        # Defaults under the record: a record written before an option existed still reads every option. Secrets
        # are never recorded: the create that was given them passes them in, later commands read the environment.
        secrets = self._secrets if self._secrets is not None else {o.key: o.parse(None) for o in self.options
                                                                    if o.secret}
        return {o.key: o.default for o in self.options} | self.machine.options | secrets

    @classmethod
    def split_secrets(cls, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(what may be recorded, the secrets) of parsed option values."""
        secret = {o.key for o in cls.options if o.secret}
        return ({k: v for k, v in values.items() if k not in secret}, {k: v for k, v in values.items() if k in secret})

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Refuse option values no create could take (a bound, a checksum without its image, an image path that
        is not there) without asking a hypervisor or cloud anything: a plan of several machines (a molecule
        scenario) is checked with it before any is made."""

    @classmethod
    def pre_create_check(cls, options: dict[str, Any]) -> None:
        """Refuse, before anything is written, a create that cannot succeed on this host."""

    @classmethod
    def check_engine(cls, options: dict[str, Any], engine: dict[str, Any]) -> None:
        """Refuse, before anything is written, engine settings (provision.engine_config) that the host this
        driver makes with `options` cannot run: raise UsageError in one line naming the option that would work."""

    @classmethod
    def prune_cache(cls, store: Store, everything: bool, dry_run: bool) -> list[Pruned]:
        """Remove what the driver keeps for its machines to share (engine layers, a pool's copy of an image) that
        no machine uses and that is no longer current (with `everything`, current too: the next create makes it
        again); with `dry_run`, only say what. Nothing to remove by default."""
        return []

    @abstractmethod
    def create(self) -> None:
        """Make and boot the host; record every resource in `machine.record()` as soon as it exists."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None:
        """Shut down cleanly, forcing it after a timeout."""

    def restart(self) -> None:
        self.stop()
        self.start()

    @abstractmethod
    def kill(self) -> None: ...

    @abstractmethod
    def remove(self) -> None:
        """Destroy the host and everything it may have made, found by the machine's identity and its journal.

        Safe on a half-made machine and on one recovered from its journal (some resources never recorded);
        tries every resource and raises one MachineError naming those it could not remove.
        """

    @abstractmethod
    def leftovers(self) -> list[str]:
        """What of the machine still exists outside its directory, one short phrase each; empty when nothing.

        `rm` keeps the machine's record while anything is left, and `ls` shows it.
        """

    @abstractmethod
    def state(self) -> State: ...

    # -- where the host is: defaults from the resources a driver records (`ip`, and forwarded ports if any) --
    def ip(self) -> str | None:
        return self.machine.resources.get("ip")

    def ssh_endpoint(self) -> Endpoint:
        address = self.ip()
        if address is None:
            raise MachineError(f"machine {self.machine.name!r} has no address yet")
        return Endpoint(address, self.machine.resources.get("ssh_port", 22), self.ssh_user)

    def engine_url(self) -> str:
        """Where the docker CLI reaches the engine ("" before the host has an address)."""
        address = self.ip()
        port = self.machine.resources.get("engine_port", ENGINE_PORT)
        return f"tcp://{host_port(address, port)}" if address else ""

    def cert_names(self) -> list[str]:
        """The addresses and DNS names the engine's certificate must carry (a cloud host has several)."""
        address = self.ip()
        return [address] if address else []

    def not_running(self) -> MachineError:
        """What a command that needs the machine up says when it is not (a driver that owns the power: start it)."""
        name = self.machine.name
        return MachineError(f"machine {name!r} is not running (start it with `pymachine start {name}`)")

    def is_alive(self) -> bool:
        """Cheap liveness check used while waiting for SSH, so a host that died fails fast."""
        return self.state() in (State.RUNNING, State.STARTING)

    # -- swarm mode: where the machine's swarm peers reach it, and what lets them through ---------------
    def swarm_address(self) -> str | None:
        """The address the engine advertises to the other nodes of its swarm (they must reach it there)."""
        return self.ip()

    def open_swarm_ports(self, peers: Sequence[Driver]) -> None:
        """Let this machine and `peers` (the other machines of the swarm it joins) reach each other's swarm ports
        (2377/tcp, 7946/tcp+udp, 4789/udp). Nothing to do by default: a host firewall is the roles' business."""

    def close_swarm_ports(self, peers: Sequence[Driver]) -> None:
        """Take back what open_swarm_ports(peers) opened (the machine left the swarm)."""
