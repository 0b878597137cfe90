"""The engine cache's seam between provisioning and drivers: what provisioning will install, as plain data.

Provisioning never sees a driver, and a driver never sees a role. Before `create` makes the host, it turns the
machine's engine settings into a `PackageSet` (read from the engine role's own package table, so the cache and
the role cannot disagree) and hands it to a driver that can prepare it (`PreparesPackages`): the local driver
pre-installs it in a shared read-only layer under the machine's root (drivers/local/layers.py), the libvirt
driver in a backing volume under the machine's disk (drivers/libvirt/engine_layer.py). Provisioning
then runs unchanged: the package tasks find everything installed and report ok; the rest runs as always.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from machine.paths import roles_dir


@dataclass(frozen=True)
class PackageSet:
    """Distribution packages the roles will install (apt names, on a Debian-family host)."""

    name: str  # e.g. "docker-distro": for messages and the cache's directory names
    apt: tuple[str, ...]


@runtime_checkable
class PreparesPackages(Protocol):
    """A driver that can make a host with a package set already installed (an optional capability)."""

    def prepare_packages(self, packages: PackageSet) -> None:
        """Remember `packages` for the next `create()`: its host should come with them installed."""

    def refresh_packages(self, packages: PackageSet) -> None:
        """Check the prepared `packages` against the archive now, rebuilding what moved on (`upgrade`)."""


def package_set(engine: dict[str, Any]) -> PackageSet | None:
    """The engine packages provisioning installs for these recorded engine settings, or None when they cannot be
    prepared ahead: Docker's official repository is added by the role itself (its key and list are per machine
    run, and the repository is not reachable from every host), so only `distro` docker and podman qualify."""
    name, install = engine.get("engine", "docker"), engine.get("engine_install", "official")
    if name == "docker" and install != "distro":
        return None
    import yaml  # late: the local driver imports this module for every command

    table = yaml.safe_load((roles_dir() / "engine" / "vars" / "main.yml").read_text())["engine_packages"]
    packages = table.get(name, {}).get(install, {}).get("Debian")
    return PackageSet(f"{name}-{install}", tuple(packages)) if packages else None
