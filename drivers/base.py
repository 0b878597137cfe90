"""The small interface every driver implements. Drivers make hosts; they know nothing about provisioning."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from machine.errors import UsageError
from machine.ssh import Endpoint
from machine.store import Machine, Store


class State(StrEnum):
    RUNNING = "Running"
    STOPPED = "Stopped"
    STARTING = "Starting"
    ERROR = "Error"


@dataclass(frozen=True)
class Option:
    """A driver flag: `--{name}` on the command line, `PYMACHINE_{NAME}` in the environment."""

    name: str
    help: str
    default: Any = None
    type: type = str
    choices: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return "PYMACHINE_" + self.key.upper()

    def parse(self, raw: Any) -> Any:
        """Turn a flag or environment value into this option's type, or raise UsageError."""
        where = f"--{self.name}"
        if raw is None and self.env in os.environ:
            raw, where = os.environ[self.env], self.env  # name what the user set, not a flag they never typed
        if raw is None:
            raw = self.default
        if raw is None:
            return None
        try:
            value = _BOOL[str(raw).lower()] if self.type is bool else self.type(raw)
        except (ValueError, KeyError):
            raise UsageError(f"{where}: {raw!r} is not a valid {self.type.__name__}") from None
        if self.choices and value not in self.choices:
            raise UsageError(f"{where}: {raw!r} is not one of {', '.join(self.choices)}")
        return value


_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


class Driver(ABC):
    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, machine: Machine, store: Store) -> None:
        self.machine = machine
        self.store = store

    @property
    def opts(self) -> dict[str, Any]:
        # Defaults under the record: a record written before an option existed still reads every option.
        return {o.key: o.default for o in self.options} | self.machine.options

    @classmethod
    def pre_create_check(cls, options: dict[str, Any]) -> None:
        """Refuse, before anything is written, a create that cannot succeed on this host."""

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

    @abstractmethod
    def ip(self) -> str | None: ...

    @abstractmethod
    def ssh_endpoint(self) -> Endpoint: ...

    def is_alive(self) -> bool:
        """Cheap liveness check used while waiting for SSH, so a host that died fails fast."""
        return self.state() in (State.RUNNING, State.STARTING)
