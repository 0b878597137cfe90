"""Molecule platforms as pymachine machines: what a platform may say, checked before anything is made."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from machine import drivers, fleetfile
from machine.commands import parse_driver_options
from machine.drivers.base import Driver
from machine.errors import UsageError
from machine.names import validate_name

# Keys molecule itself reads from a platform, and the ones this driver adds.
_MOLECULE_KEYS = {"name", "groups", "children"}
_OWN_KEYS = {"driver", "options", "engine", "engine_options", "image"}
# The option a platform's `image` sets, per pymachine driver.
_IMAGE_OPTION = {"local": "local_image", "libvirt": "libvirt_image", "ec2": "ec2_ami"}


@dataclass
class Platform:
    """One platform: the arguments of its `pymachine create`."""

    name: str
    driver: str = drivers.DEFAULT
    options: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] | None = None  # provision.engine_config(...) when the engine is installed at create


def scenario_home(ephemeral_directory: str | os.PathLike[str]) -> Path:
    """The scenario's own pymachine home."""
    return Path(ephemeral_directory) / "pymachine"


def check_platforms(raw: list[dict[str, Any]] | None) -> list[Platform]:
    """Every platform parsed, or UsageError naming the platform and what is wrong with it."""
    platforms = [_platform(item) for item in raw or []]
    names = [p.name for p in platforms]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UsageError(f"platform {duplicate!r} is named twice")
    return platforms


def _platform(item: dict[str, Any]) -> Platform:
    name = str(item.get("name", ""))
    try:
        validate_name(name)
        unknown = sorted(set(item) - _MOLECULE_KEYS - _OWN_KEYS)
        if unknown:
            raise UsageError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_OWN_KEYS))})")
        driver = str(item.get("driver", drivers.DEFAULT))
        cls = drivers.get(driver)  # an unknown driver names the known ones
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise UsageError("options must be a mapping of driver options (e.g. local-isolation: privileged)")
        keys = {str(k).replace("-", "_"): v for k, v in options.items()}
        raw = {key: _flag_value(cls, key, v) for key, v in keys.items()}
        if "image" in item:
            if driver not in _IMAGE_OPTION:
                raise UsageError(f"the {driver} driver takes no image")
            raw[_IMAGE_OPTION[driver]] = str(item["image"])
        parsed = parse_driver_options(driver, raw)
        cls.check_options(parsed)
        engine = _engine(item)  # checked even when unused: a typo is named, never ignored
        if item.get("engine_options") and not item.get("engine"):
            raise UsageError("engine_options are only used when the engine is installed: add `engine: true`")
        if item.get("engine"):
            cls.check_engine(parsed, engine)
        return Platform(name, driver, {k: v for k, v in raw.items() if parsed.get(k) is not None},
                        engine if item.get("engine") else None)
    except UsageError as e:
        raise UsageError(f"platform {name or '(unnamed)'}: {e}") from None


def _flag_value(cls: type[Driver], key: str, value: Any) -> Any:
    """A YAML value as the command line would give it (lists stay lists for repeatable options)."""
    if not isinstance(value, list):
        return str(value)
    option = next((o for o in cls.options if o.key == key), None)
    if option is not None and not option.multiple:
        raise UsageError(f"--{option.name} takes one value, not a list")
    return [str(v) for v in value]


def _engine(item: dict[str, Any]) -> dict[str, Any]:
    """The engine settings of `engine_options`, named as create's engine flags (engine-install: distro)."""
    options = item.get("engine_options") or {}
    if not isinstance(options, dict):
        raise UsageError("engine_options must be a mapping (e.g. engine-install: distro)")
    keys = {str(k).replace("-", "_"): v for k, v in options.items()}
    unknown = sorted(set(keys) - set(fleetfile.ENGINE_OPTIONS))
    if unknown:
        raise UsageError(f"unknown engine option {unknown[0]!r} (known: {', '.join(fleetfile.ENGINE_OPTIONS)})")
    # Typed as a fleet file's are (`engine-mtu: big` is refused by name, not left to fail deep in the engine's
    # settings); an empty value is as if not given.
    values = {key: fleetfile.engine_value(key, v, lambda why, key=key: UsageError(f"{key}: {why}"))
              for key, v in keys.items() if v is not None}
    return fleetfile.engine_config(values)
