"""Driver registry. Driver modules import their heavy libraries lazily, so listing options stays cheap."""

from __future__ import annotations

import importlib

from machine.drivers.base import Driver
from machine.errors import UsageError

_MODULES = {"local": "machine.drivers.local", "libvirt": "machine.drivers.libvirt", "ec2": "machine.drivers.ec2",
            "generic": "machine.drivers.generic"}

DEFAULT = "local"


def names() -> list[str]:
    return list(_MODULES)


def get(name: str) -> type[Driver]:
    try:
        module = importlib.import_module(_MODULES[name])
    except KeyError:
        raise UsageError(f"unknown driver {name!r} (choose from {', '.join(_MODULES)})") from None
    return module.DRIVER
