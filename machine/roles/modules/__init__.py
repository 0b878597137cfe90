"""The module registry: every name a task may use, short and fully qualified."""

from __future__ import annotations

from machine.roles.modules.base import SHOWN, Arg, Context, Module, ModuleFailure
from machine.roles.modules.commands import Command, Shell
from machine.roles.modules.files import Copy, File, LineInFile, Template
from machine.roles.modules.internal import Assert, Debug, Fail, SetFact
from machine.roles.modules.net import GetUrl, WaitFor
from machine.roles.modules.packages import Apt, Dnf, Package, Yum
from machine.roles.modules.system import Group, Modprobe, Service, Sysctl, Systemd, User

_CLASSES: tuple[type[Module], ...] = (
    Command, Shell, Copy, File, LineInFile, Template, Assert, Debug, Fail, SetFact, GetUrl, WaitFor,
    Apt, Dnf, Yum, Package, Group, Modprobe, Service, Sysctl, Systemd, User,
)


def _registry() -> dict[str, type[Module]]:
    out: dict[str, type[Module]] = {}
    for cls in _CLASSES:
        # sysctl and modprobe live in collections (ansible.posix, community.general), not in ansible.builtin.
        builtin = not any("." in name for name in cls.names)
        for name in cls.names:
            out[name] = cls
            if builtin and "." not in name:
                out[f"ansible.builtin.{name}"] = cls
    return out


MODULES = _registry()

__all__ = ["MODULES", "SHOWN", "Arg", "Context", "Module", "ModuleFailure"]
