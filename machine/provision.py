"""What provisioning runs: the role list, and the role variables that create's engine flags map to."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from machine.errors import UsageError

ROLES = ("kernel", "storage", "tls", "engine", "bridge")
ENGINES = ("docker", "podman")
INSTALL_METHODS = ("official", "distro")
STORAGE_DRIVERS = ("overlay2", "btrfs", "zfs", "vfs", "fuse-overlayfs", "devicemapper", "aufs")
TLS_DIR = "/etc/docker/tls"


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


def _address_pool(item: str) -> dict[str, Any]:
    fields = _pairs("engine-default-address-pool", item.split(","))
    try:
        base = ipaddress.ip_network(fields["base"], strict=True)
        size = int(fields["size"])
    except (KeyError, ValueError) as e:
        raise UsageError(f"--engine-default-address-pool: {item!r} is not base=CIDR,size=N ({e})") from None
    if not base.prefixlen <= size <= base.max_prefixlen:
        raise UsageError(f"--engine-default-address-pool: size {size} does not fit in {base}")
    return {"base": str(base), "size": size}


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
) -> dict[str, Any]:
    """Validate create's engine flags and return them as the machine's recorded engine settings."""
    for flag, value, allowed in [("engine", engine, ENGINES), ("engine-install", install, INSTALL_METHODS),
                                 ("engine-storage-driver", storage_driver, STORAGE_DRIVERS)]:
        if value not in allowed:
            raise UsageError(f"--{flag}: {value!r} is not one of {', '.join(allowed)}")
    if storage_driver == "aufs":
        raise UsageError("--engine-storage-driver aufs: no current engine supports aufs; use overlay2")
    if bip:
        try:
            interface = ipaddress.ip_interface(bip)
        except ValueError:
            raise UsageError(f"--engine-bip: {bip!r} is not an address with a prefix (e.g. 10.250.0.1/24)") from None
        if interface.ip == interface.network.network_address:
            raise UsageError(f"--engine-bip: {bip} is a network address; give the bridge's own (e.g. .1)")
    if mtu is not None and not 68 <= mtu <= 65535:
        raise UsageError(f"--engine-mtu: {mtu} is not between 68 and 65535")
    _pairs("engine-label", labels)
    return {
        "engine": engine,
        "engine_install": install,
        "engine_storage_driver": storage_driver,
        "engine_storage_device": storage_device or "",
        "engine_opts": {k: _json_value(v) for k, v in _pairs("engine-opt", opts).items()},
        "engine_labels": list(labels),
        "engine_env": _pairs("engine-env", env),
        "engine_insecure_registries": list(insecure_registries),
        "engine_registry_mirrors": list(registry_mirrors),
        "engine_bip": bip or "",
        "engine_default_address_pools": [_address_pool(p) for p in address_pools],
        "engine_mtu": mtu or 0,
        "engine_icc": icc,
        "engine_iptables": iptables,
        "engine_ip_forward": ip_forward,
        "tls_san": list(tls_san),
    }


def role_vars(engine: dict[str, Any], ca_pem: str, server_cert: str, server_key: str) -> dict[str, Any]:
    """Extra variables for the roles: the recorded engine settings plus this run's TLS material."""
    settings = {k: v for k, v in engine.items() if k != "tls_san"}
    return {**settings, "tls_dir": TLS_DIR, "tls_ca_cert": ca_pem, "tls_server_cert": server_cert,
            "tls_server_key": server_key}
