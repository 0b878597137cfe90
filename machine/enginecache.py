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
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

from machine.errors import MachineError
from machine.paths import roles_dir

_KEY_TIMEOUT = 30.0  # seconds
_KEY_LIMIT = 1 << 20  # bytes: a key is a few KiB


class RepositoryFiles(NamedTuple):
    """What the engine role writes to add a repository on one host: the key (downloaded) and the list."""

    key_url: str
    key_path: str
    list_path: str
    list_text: str


@dataclass(frozen=True)
class Repository:
    """Docker's apt repository, which the engine role adds before installing from it (engine_install=official)."""

    url: str  # engine_official_url
    channel: str  # engine_official_channel

    def files(self, facts: dict[str, Any]) -> RepositoryFiles:
        """The files the role's tasks (roles/engine/tasks/official-apt.yml) write on a host with these facts
        (machine.roles.facts), read from those tasks and rendered from its own template: prepared ahead, they are
        what the role would write, so it finds them in place and changes nothing."""
        import yaml  # late, with the role engine's templating: only a layer build needs them

        from machine.roles.facts import as_variables
        from machine.roles.templating import Templar

        role = roles_dir() / "engine"
        tasks = yaml.safe_load((role / "tasks" / "official-apt.yml").read_text())
        key, listing = (_task_args(tasks, module) for module in ("get_url", "template"))
        variables = {**_role_vars(role), **as_variables(facts), "engine_official_url": self.url,
                     "engine_official_channel": self.channel}
        templar = Templar()
        return RepositoryFiles(templar.template(key["url"], variables), key["dest"], listing["dest"],
                               templar.render_file(role / "templates" / listing["src"], variables))

    def key(self, files: RepositoryFiles) -> bytes:
        """The repository's signing key, downloaded from where the role downloads it (MachineError saying what
        to do instead, as the role's own failure does, when it cannot be had)."""
        import urllib.request

        try:
            with urllib.request.urlopen(files.key_url, timeout=_KEY_TIMEOUT) as response:
                return response.read(_KEY_LIMIT)
        except (OSError, ValueError) as e:
            raise MachineError(
                f"installing Docker Engine from Docker's repository {self.url} failed (its key {files.key_url}: "
                f"{getattr(e, 'reason', e)}); if this host cannot reach it, use --engine-install distro to install "
                f"the distribution's packages") from None


@dataclass(frozen=True)
class PackageSet:
    """Distribution packages the roles will install (apt names, on a Debian-family host), and the repository
    they come from when the role adds one."""

    name: str  # e.g. "docker-distro": for messages and the cache's directory names
    apt: tuple[str, ...]
    repository: Repository | None = None


@runtime_checkable
class PreparesPackages(Protocol):
    """A driver that can make a host with a package set already installed (an optional capability)."""

    def prepare_packages(self, packages: PackageSet) -> None:
        """Remember `packages` for the next `create()`: its host should come with them installed."""

    def refresh_packages(self, packages: PackageSet) -> None:
        """Check the prepared `packages` against the archive now, rebuilding what moved on (`upgrade`)."""


def package_set(engine: dict[str, Any]) -> PackageSet | None:
    """The engine packages provisioning installs for these recorded engine settings (from the engine role's
    package table, so the cache and the role cannot disagree), or None when they cannot be prepared ahead (no
    Debian packages for them)."""
    name, install = engine.get("engine", "docker"), engine.get("engine_install", "official")
    role_vars = _role_vars(roles_dir() / "engine")
    packages = role_vars["engine_packages"].get(name, {}).get(install, {}).get("Debian")
    if not packages:
        return None
    repository = None
    if (name, install) == ("docker", "official"):
        repository = Repository(engine.get("engine_official_url", role_vars["engine_official_url"]),
                                role_vars["engine_official_channel"])
    return PackageSet(f"{name}-{install}", tuple(packages), repository)


def _role_vars(role: Path) -> dict[str, Any]:
    """A role's defaults under its vars, as the role sees them before any play's variables."""
    import yaml  # late: the local driver imports this module for every command

    return {k: v for part in ("defaults", "vars") for k, v in
            (yaml.safe_load((role / part / "main.yml").read_text()) or {}).items()}


def _task_args(tasks: list[dict[str, Any]], module: str) -> dict[str, Any]:
    """The arguments of the first task of `tasks` that runs `module` (its short or ansible.builtin name)."""
    return next(task.get(f"ansible.builtin.{module}") or task[module] for task in tasks
                if f"ansible.builtin.{module}" in task or module in task)
