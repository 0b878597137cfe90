"""What provisioning runs: the role list, and the role variables that create's engine flags map to."""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from machine.endpoint import is_dns_name, is_ip
from machine.errors import UsageError
from machine.paths import roles_dir
from machine.store import Store

ROLES = ("kernel", "storage", "tls", "engine", "bridge", "registry")
ENGINES = ("docker", "podman")
INSTALL_METHODS = ("official", "distro")
STORAGE_DRIVERS = ("overlay2", "btrfs", "zfs", "vfs", "fuse-overlayfs", "devicemapper", "aufs")
# The roles refuse the others for podman too, but only once the machine exists; say it before.
PODMAN_STORAGE_DRIVERS = ("overlay2", "btrfs", "zfs", "vfs", "fuse-overlayfs")
# Drivers that put the engine's data on --engine-storage-device; the others ignore a device.
DEVICE_STORAGE_DRIVERS = ("btrfs", "zfs", "devicemapper")
TLS_DIR = "/etc/docker/tls"
# Where a machine's registry serves HTTPS (role registry): the port Docker's registry uses.
REGISTRY_PORT = 5000
# Tags Ansible gives a meaning of its own; every other tag selects the tasks that carry it.
_SPECIAL_TAGS = frozenset({"all", "always", "never", "tagged", "untagged"})

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# daemon.json keys that have a flag of their own: an --engine-opt would silently override that flag.
_OPT_FLAGS = {
    "storage-driver": "--engine-storage-driver", "bip": "--engine-bip", "mtu": "--engine-mtu",
    "icc": "--[no-]engine-icc", "iptables": "--[no-]engine-iptables", "ip-forward": "--[no-]engine-ip-forward",
    "labels": "--engine-label", "registry-mirrors": "--engine-registry-mirror",
    "insecure-registries": "--engine-insecure-registry", "default-address-pools": "--engine-default-address-pool",
}
# The engine is reachable only over mutual TLS: its listeners and certificates are pymachine's alone.
_TLS_OPTS = frozenset({"hosts", "tls", "tlsverify", "tlscacert", "tlscert", "tlskey"})


def _pairs(flag: str, items: tuple[str, ...] | list[str]) -> dict[str, str]:
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--{flag}: {item!r} is not KEY=VALUE")
        result[key] = value
    return result


def _json_value(text: str) -> Any:
    """`--engine-opt max-concurrent-downloads=5` means the number 5, `debug=true` the boolean."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _engine_opts(items: tuple[str, ...]) -> dict[str, Any]:
    opts = _pairs("engine-opt", items)
    for key in opts:
        if key in _TLS_OPTS:
            raise UsageError(f"--engine-opt {key}: pymachine sets it (the engine listens only on its unix socket "
                             f"and on mutual TLS)")
        if key in _OPT_FLAGS:
            raise UsageError(f"--engine-opt {key}: use {_OPT_FLAGS[key]}")
    return {k: _json_value(v) for k, v in opts.items()}


def _engine_env(items: tuple[str, ...]) -> dict[str, str]:
    env = _pairs("engine-env", items)
    for key in env:
        if not _ENV_NAME.fullmatch(key):
            raise UsageError(f"--engine-env: {key!r} is not a variable name (letters, digits, _; not a digit first)")
    return env


def _address_pool(item: str) -> dict[str, Any]:
    fields = _pairs("engine-default-address-pool", item.split(","))
    unknown = sorted(set(fields) - {"base", "size"})
    if unknown:
        raise UsageError(f"--engine-default-address-pool: {item!r}: unknown field {unknown[0]!r} "
                         f"(use base=CIDR,size=N)")
    try:
        base = ipaddress.ip_network(fields["base"], strict=True)
        size = int(fields["size"])
    except (KeyError, ValueError) as e:
        raise UsageError(f"--engine-default-address-pool: {item!r} is not base=CIDR,size=N ({e})") from None
    if not base.prefixlen <= size <= base.max_prefixlen:
        raise UsageError(f"--engine-default-address-pool: size {size} does not fit in {base}")
    return {"base": str(base), "size": size}


def _tls_san(value: str) -> str:
    if not (is_ip(value) or is_dns_name(value, wildcard=True)):
        raise UsageError(f"--tls-san: {value!r} is neither an IP address nor a DNS name")
    return value


def _is_host_port(text: str) -> bool:
    """HOST or HOST:PORT (an IPv6 address in brackets), nothing else: no scheme, user or path."""
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError:  # a port that is not a number, or out of range
        return False
    host = parts.hostname or ""
    return (not parts.path and not parts.username and port != 0 and "://" not in text
            and (is_ip(host) or is_dns_name(host)))


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return "/" in text


def _insecure_registry(value: str) -> str:
    """A registry as dockerd's insecure-registries take it: HOST[:PORT], or a CIDR of registries."""
    if not (_is_host_port(value) or _is_network(value)):
        raise UsageError(f"--engine-insecure-registry: {value!r} is not HOST[:PORT] (no scheme) or a CIDR")
    return value


def _http_url(flag: str, value: str) -> str:
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError as e:
        raise UsageError(f"--{flag}: {value!r}: {e}") from None
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not (is_ip(host) or is_dns_name(host)) or port == 0:
        raise UsageError(f"--{flag}: {value!r} is not an http(s) URL")
    return value


def _registry_mirror(value: str) -> str:
    return _http_url("engine-registry-mirror", value)


def _check_bip(bip: str) -> None:
    try:
        interface = ipaddress.ip_interface(bip)
    except ValueError:
        raise UsageError(f"--engine-bip: {bip!r} is not an address with a prefix (e.g. 10.250.0.1/24)") from None
    if interface.version != 4:
        raise UsageError(f"--engine-bip: {bip} is not IPv4 (the engine's default bridge is IPv4)")
    if interface.ip == interface.network.network_address:
        raise UsageError(f"--engine-bip: {bip} is a network address; give the bridge's own (e.g. .1)")


def _check_storage(engine: str, storage_driver: str, storage_device: str | None) -> None:
    if storage_driver == "aufs":
        raise UsageError("--engine-storage-driver aufs: no current engine supports aufs; use overlay2")
    if engine == "podman" and storage_driver not in PODMAN_STORAGE_DRIVERS:
        raise UsageError(f"--engine-storage-driver {storage_driver}: podman supports "
                         f"{', '.join(PODMAN_STORAGE_DRIVERS)}")
    if storage_device is None:
        return
    if storage_driver not in DEVICE_STORAGE_DRIVERS:
        raise UsageError(f"--engine-storage-device needs --engine-storage-driver "
                         f"{' or '.join(DEVICE_STORAGE_DRIVERS)} (not {storage_driver})")
    if not storage_device.startswith("/"):
        raise UsageError(f"--engine-storage-device: {storage_device!r} is not an absolute path (e.g. /dev/vdb)")


def _check_choices(engine: str, install: str, storage_driver: str) -> None:
    for flag, value, allowed in [("engine", engine, ENGINES), ("engine-install", install, INSTALL_METHODS),
                                 ("engine-storage-driver", storage_driver, STORAGE_DRIVERS)]:
        if value not in allowed:
            raise UsageError(f"--{flag}: {value!r} is not one of {', '.join(allowed)}")


def engine_config(
    engine: str = "docker",
    install: str = "official",
    storage_driver: str = "overlay2",
    storage_device: str | None = None,
    opts: tuple[str, ...] = (),
    labels: tuple[str, ...] = (),
    env: tuple[str, ...] = (),
    insecure_registries: tuple[str, ...] = (),
    registry_mirrors: tuple[str, ...] = (),
    bip: str | None = None,
    address_pools: tuple[str, ...] = (),
    mtu: int | None = None,
    icc: bool = True,
    iptables: bool = True,
    ip_forward: bool = True,
    tls_san: tuple[str, ...] = (),
    registry: bool = False,
    install_url: str | None = None,
) -> dict[str, Any]:
    """Validate create's engine flags and return them as the machine's recorded engine settings."""
    _check_choices(engine, install, storage_driver)
    if install_url and (engine, install) != ("docker", "official"):
        raise UsageError("--engine-install-url: only Docker's official repository (--engine-install official) has one")
    _check_storage(engine, storage_driver, storage_device)
    if bip:
        _check_bip(bip)
    if mtu is not None and not 68 <= mtu <= 65535:
        raise UsageError(f"--engine-mtu: {mtu} is not between 68 and 65535")
    _pairs("engine-label", labels)
    return {
        "engine": engine,
        "engine_install": install,
        "engine_storage_driver": storage_driver,
        "engine_storage_device": storage_device or "",
        "engine_opts": _engine_opts(opts),
        "engine_labels": list(labels),
        "engine_env": _engine_env(env),
        "engine_insecure_registries": [_insecure_registry(r) for r in insecure_registries],
        "engine_registry_mirrors": [_registry_mirror(m) for m in registry_mirrors],
        "engine_bip": bip or "",
        "engine_default_address_pools": [_address_pool(p) for p in address_pools],
        "engine_mtu": mtu or 0,
        "engine_icc": icc,
        "engine_iptables": iptables,
        "engine_ip_forward": ip_forward,
        "tls_san": [_tls_san(name) for name in tls_san],
        "registry_enabled": registry,
        # Recorded only when given: the role's default (download.docker.com) serves the rest.
        **({"engine_official_url": _http_url("engine-install-url", install_url).rstrip("/")} if install_url else {}),
    }


def role_vars(engine: dict[str, Any], ca_pem: str, server_cert: str, server_key: str) -> dict[str, Any]:
    """Extra variables for the roles: the recorded engine settings plus this run's TLS material."""
    settings = {k: v for k, v in engine.items() if k != "tls_san"}
    return {**settings, "tls_dir": TLS_DIR, "tls_ca_cert": ca_pem, "tls_server_cert": server_cert,
            "tls_server_key": server_key}


def registry_vars(trusted: Sequence[str], tls: tuple[str, str] | None = None) -> dict[str, Any]:
    """The registry role's variables: the registries to trust (HOST:PORT) and, on a registry's machine, its
    certificate and key."""
    values: dict[str, Any] = {"registry_port": REGISTRY_PORT, "registry_trusted": list(trusted)}
    if tls:
        values["registry_tls_cert"], values["registry_tls_key"] = tls
    return values


def own_vars() -> frozenset[str]:
    """The names of every variable pymachine gives the roles itself (role_vars and registry_vars, with each value
    they may leave out given): a fleet's vars must not override them."""
    every_setting = engine_config(install_url="https://download.docker.com/linux")  # its URL is recorded if given
    return frozenset({*role_vars(every_setting, "", "", ""), *registry_vars([], ("", ""))})


def check_roles(tags: Sequence[str] = ()) -> None:
    """Refuse broken roles (YAML, an unknown module or keyword, a missing or broken template) before a machine
    is made or touched, and a tag no task has: Ansible would run nothing for a misspelt tag, and succeed."""
    from machine.roles.loader import as_list, keep_plays, load_play, shared_templar, walk  # the heaviest import

    # Every command that provisions comes here first: the roles' loaded plays and compiled templates are kept in
    # the cache between commands. A run (machine.roles.run_roles) writes them: a command refused here writes
    # nothing.
    cache = Store().cache_dir
    keep_plays(cache / "role-plays.pickle")
    shared_templar().code.keep(cache / "role-templates.marshal")
    runs = load_play(list(ROLES), roles_dir())
    tasks = [task for run in runs for task in walk([*run.role.tasks, *run.role.handlers])]
    if not tags or any(task.action == "include_tasks" and task.tasks is None for task in tasks):
        return  # the tasks of a file named by a template, and so their tags, are only known when it runs
    known = {str(tag) for task in tasks for tag in as_list(task.get("tags"))}
    unknown = [tag for tag in tags if tag not in known | _SPECIAL_TAGS]
    if unknown:
        raise UsageError(f"--tags: {unknown[0]!r} is not a tag of the roles (they have {', '.join(sorted(known))})")
