"""The libvirt driver: a QEMU/KVM virtual machine booted from a cloud image, configured by cloud-init.

Each machine's disk is a qcow2 overlay over a base image that is downloaded once and uploaded once into the
storage pool (with the engine cache, over a layer of the engine's packages over it: engine_layer.py); a
NoCloud seed carries the machine's SSH key, hostname and a host key pinned before boot.
The guest is reached on a libvirt network (its DHCP lease) or, with `--libvirt-network user`, through
loopback ports that QEMU forwards to its SSH and engine ports.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from machine import sshkeys, ui
from machine.drivers.base import Driver, Option, Pruned, State, each_step
from machine.drivers.libvirt import catalog, domain, network, seed, storage
from machine.drivers.libvirt.connection import connect, is_missing, libvirt_module, message
from machine.enginecache import PackageSet
from machine.errors import MachineError, UsageError
from machine.store import Store, disk_usage, file_lock, write_atomic

if TYPE_CHECKING:
    import libvirt

log = logging.getLogger("pymachine.libvirt")
STOP_TIMEOUT = 60.0
# From power-on until sshd answers, its DHCP lease (on a network of libvirt's) included: ~75 s for a cloud image
# under TCG (the lease ~50 s in), several times that with other guests on the same cores.
BOOT_TIMEOUT = 600.0
MIN_MEMORY = 256
# Held shared by each create (and upgrade) from its first use of the image cache until its disk is backed by what
# it uploaded, exclusively by a prune: a prune never takes a layer or base a create is about to use.
_PRUNE_LOCK = "prune.lock"
_PRUNE_WAIT = 3600.0  # a create's layer build may take minutes under it


class LibvirtDriver(Driver):
    name = "libvirt"
    options = (
        Option("libvirt-uri", "libvirt connection URI (qemu:///session works without root)", "qemu:///system"),
        Option("libvirt-cpus", "virtual CPUs", 1, int),
        Option("libvirt-memory", "memory in MiB", 1024, int),
        Option("libvirt-disk-size", "disk size in GiB", 20, int),
        Option("libvirt-image", f"cloud image (qcow2 or raw): URL, path, or one of {', '.join(catalog.IMAGES)} "
                                f"(default {catalog.DEFAULT})"),
        Option("libvirt-image-sha256", "expected sha256 of --libvirt-image"),
        Option("libvirt-pool", "libvirt storage pool for the machine's volumes", "default"),
        Option("libvirt-network", "libvirt network name, or `user` (QEMU user networking, SSH and engine "
                                  "forwarded from 127.0.0.1)", network.USER),
        Option("libvirt-domain-type", "hypervisor: kvm, qemu (TCG emulation) or auto (kvm when available)",
               "auto", choices=("auto", "kvm", "qemu")),
        Option("libvirt-engine-layer", "the engine's packages come pre-installed from a backing volume shared by "
               "the machines of one image (built once, as root, without a boot); false: installed per machine",
               True, type=bool),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conn: libvirt.virConnect | None = None
        self._packages: PackageSet | None = None

    # -- checks -------------------------------------------------------------------------------------------
    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        for key, least, unit in (("libvirt_cpus", 1, ""), ("libvirt_memory", MIN_MEMORY, " MiB"),
                                 ("libvirt_disk_size", 1, " GiB")):
            if options[key] < least:
                raise UsageError(f"--{key.replace('_', '-')}: {options[key]} is less than {least}{unit}")
        catalog.resolve(options["libvirt_image"], options["libvirt_image_sha256"])
        if options["libvirt_network"] == network.USER and urlparse(options["libvirt_uri"]).hostname:
            raise UsageError(f"--libvirt-network user forwards ports on the libvirt host's loopback; "
                             f"{options['libvirt_uri']} is remote: use a libvirt network")

    @classmethod
    def pre_create_check(cls, options: dict[str, Any]) -> None:
        cls.check_options(options)
        uri, net = options["libvirt_uri"], options["libvirt_network"]
        conn = connect(uri)
        try:
            resolve_domain_type(conn, options["libvirt_domain_type"])
            if options["libvirt_pool"] != "default":  # `default` is created on first use, as virt-install does
                storage.pool(conn, options["libvirt_pool"])
            if net != network.USER:
                _network(conn, net)
            available = _available_memory_mib(conn)
            if available is not None and options["libvirt_memory"] > available:
                raise MachineError(f"--libvirt-memory {options['libvirt_memory']} MiB: the host has only "
                                   f"{available} MiB available")
        finally:
            conn.close()

    # -- connection and records ---------------------------------------------------------------------------
    @property
    def conn(self) -> libvirt.virConnect:
        # One closed under us (libvirtd restarted, or dropped this client) is opened again: a failed create's
        # rollback still reaches what it made.
        if self._conn is None or not self._conn.isAlive():
            self._conn = connect(self.opts["libvirt_uri"])
        return self._conn

    @property
    def _user_net(self) -> bool:
        return self.opts["libvirt_network"] == network.USER

    # Volume names carry the machine's identity: `rm -f` finds them even if their record never reached the journal.
    @property
    def _disk_name(self) -> str:
        return f"{self.machine.name}-{self.machine.id}.qcow2"

    @property
    def _seed_name(self) -> str:
        return f"{self.machine.name}-{self.machine.id}-seed.iso"

    def _domain(self) -> libvirt.virDomain | None:
        """This machine's domain, or None if it has none (never a domain pymachine did not create)."""
        recorded = self.machine.resources.get("uuid")
        lv = libvirt_module()
        try:
            # The UUID is journaled before the domain is defined; the name (with our metadata) is a fallback.
            dom = self.conn.lookupByUUIDString(recorded) if recorded else self.conn.lookupByName(self.machine.name)
        except lv.libvirtError as e:
            if is_missing(e):
                return None
            raise MachineError(f"domain of {self.machine.name}: {message(e)}") from None
        found = domain.owner(dom)
        return dom if found is not None and found.machine_id == self.machine.id else None

    def _spec(self) -> domain.DomainSpec:
        r, o = self.machine.resources, self.opts
        return domain.DomainSpec(
            name=self.machine.name, uuid=r["uuid"], machine_id=self.machine.id, home=str(self.store.home),
            domain_type=r["domain_type"], cpus=o["libvirt_cpus"], memory=o["libvirt_memory"], pool=r["pool"],
            disk=r["disk"], seed=r["seed"], network=o["libvirt_network"], mac=r["mac"],
            console_log=str(self._console_log),
            ssh_port=r.get("ssh_port", 0), engine_port=r.get("engine_port", 0),
        )

    # -- lifecycle ----------------------------------------------------------------------------------------
    def create(self) -> None:
        o, name = self.opts, self.machine.name
        self._refuse_taken_name()
        domain_type = resolve_domain_type(self.conn, o["libvirt_domain_type"])
        image = catalog.fetch(catalog.resolve(o["libvirt_image"], o["libvirt_image_sha256"]),
                              self.store.cache("libvirt"))
        fmt, virtual_size = storage.image_info(image)
        capacity = o["libvirt_disk_size"] * storage.GIB
        if capacity < virtual_size:
            raise MachineError(f"--libvirt-disk-size {o['libvirt_disk_size']} GiB is smaller than the image "
                               f"({-(-virtual_size // storage.GIB)} GiB)")
        pool = self._pool()
        with _using_cache(self.store):  # until the disk is backed by what it uploads: a prune would see it unused
            with ui.step("uploading the base image into the storage pool (once per image)"):
                base = storage.base_volume(pool, image, self.store.cache("libvirt"))
            backing = self._engine_layer(pool, image, base, fmt) if self._packages else None
            if backing is not None:
                base, fmt = backing, "qcow2"
            self.machine.record(pool=pool.name(), domain_type=domain_type, mac=network.new_mac(),
                                disk=self._disk_name)
            storage.overlay(pool, self._disk_name, base, fmt, capacity)

        host_key = sshkeys.new_keypair(f"root@{name}")
        user_key = sshkeys.public_line(self.machine.key_path.read_bytes(), f"pymachine@{name}")
        files = seed.render(name, f"pymachine-{self.machine.id}", user_key, host_key, self.machine.resources["mac"])
        self.machine.record(seed=self._seed_name, host_key=host_key.public_line)
        storage.upload_bytes(pool, self._seed_name, seed.iso(files))

        if self._user_net:
            ssh_port, engine_port = network.free_ports(2)
            self.machine.record(ssh_port=ssh_port, engine_port=engine_port)
        self.machine.record(uuid=str(uuid.uuid4()))  # before defining: a failed create can always find it
        self._define()
        self._boot()

    # -- the engine cache (machine/enginecache.py) ---------------------------------------------------------
    @classmethod
    def prune_cache(cls, store: Store, everything: bool, dry_run: bool) -> list[Pruned]:
        """The engine layers in the image cache, then in each pool the store's machines use (and the default
        one): the layers' volumes, and with `everything` the images' too, that no disk is backed by."""
        from machine.drivers.local import layers

        cache = store.cache_dir / "libvirt"
        if not cache.is_dir():
            return []  # this store never made a libvirt machine
        with file_lock(cache / _PRUNE_LOCK, timeout=_PRUNE_WAIT, what="the libvirt image cache"):
            pruned = []
            for copy in cache.glob("engine-roots/*/image-*.raw"):  # a layer build's, its create killed
                pruned.append(Pruned(f"interrupted layer build's copy of image {copy.parent.name}", disk_usage(copy)))
                if not dry_run:
                    copy.unlink()
            files = layers.prune(cache, everything, dry_run)
            pruned += [Pruned(f"engine layer {path.parent.name}/{path.name} (libvirt)", size) for path, size in files]
            gone = {path for path, _ in files}
            kept = {storage.layer_volume_name(generation) for generation in cache.glob(f"{layers.DIR}/*/*")
                    if generation.is_dir() and generation not in gone}
            return pruned + cls._prune_pools(
                store, lambda volume: everything or (storage.is_layer(volume) and volume not in kept), dry_run)

    @classmethod
    def _prune_pools(cls, store: Store, removable: Callable[[str], bool], dry_run: bool) -> list[Pruned]:
        """storage.prune of each pool the store's machines use, and the default one."""
        pruned = []
        for uri, pools in cls._pools(store).items():
            try:
                conn = connect(uri)
            except MachineError as e:
                log.warning("%s: its pools were not pruned", e)
                continue
            try:
                for name in sorted(pools):
                    pool = storage.find_pool(conn, name)
                    if pool is not None and pool.isActive():
                        pruned += [Pruned(f"volume {name}/{volume}", size)
                                   for volume, size in storage.prune(pool, removable, dry_run)]
            finally:
                conn.close()
        return pruned

    @classmethod
    def _pools(cls, store: Store) -> dict[str, set[str]]:
        """{URI: pool names}: the default connection's default pool, and the ones the store's machines use."""
        default = {o.key: o.parse(None) for o in cls.options}
        pools = {default["libvirt_uri"]: {default["libvirt_pool"]}}
        for name in store.names():
            with contextlib.suppress(MachineError):  # a damaged record: `ls` names it; its pool is pruned later
                machine = store.load(name)
                if machine.driver == cls.name:
                    opts = cls(machine, store).opts
                    pools.setdefault(opts["libvirt_uri"], set()).add(
                        machine.resources.get("pool", opts["libvirt_pool"]))
        return pools

    def prepare_packages(self, packages: PackageSet) -> None:
        if self.opts["libvirt_engine_layer"]:
            self._packages = packages  # create() puts the machine's disk over their layer

    def refresh_packages(self, packages: PackageSet) -> None:
        from machine.drivers.libvirt import engine_layer  # late: it brings the local driver's layers

        o = self.opts
        if not o["libvirt_engine_layer"]:
            return
        image = catalog.fetch(catalog.resolve(o["libvirt_image"], o["libvirt_image_sha256"]),
                              self.store.cache("libvirt"))
        with _using_cache(self.store), contextlib.suppress(engine_layer.Declined):  # create said why
            engine_layer.prepare(image, self.store.cache("libvirt"), packages, recheck=True)

    def _engine_layer(self, pool: libvirt.virStoragePool, image: Path, base: libvirt.virStorageVol,
                      base_format: str) -> libvirt.virStorageVol | None:
        """The volume of the engine's packages over `base` (shared by the machines made with them), or None
        when this host cannot prepare them (the roles install them then)."""
        from machine.drivers.libvirt import engine_layer

        assert self._packages is not None
        cache = self.store.cache("libvirt")
        try:
            layer = engine_layer.prepare(image, cache, self._packages)
        except engine_layer.Declined as e:
            log.warning("%s: no engine cache (%s): provisioning installs the engine's packages", self.machine.name, e)
            return None
        with ui.step("uploading the engine layer into the storage pool (once per layer)"):
            volume = storage.layer_volume(pool, layer, base, base_format, cache)
        self.machine.record(engine_layer=volume.name())
        return volume

    def _refuse_taken_name(self) -> None:
        lv = libvirt_module()
        try:
            dom = self.conn.lookupByName(self.machine.name)
        except lv.libvirtError as e:
            if is_missing(e):
                return
            raise MachineError(f"domain {self.machine.name}: {message(e)}") from None
        found = domain.owner(dom)
        if found is None:
            raise MachineError(f"libvirt already has a domain named {self.machine.name!r} that pymachine did not "
                               f"create; choose another name")
        raise MachineError(f"libvirt already has a domain named {self.machine.name!r}, made by pymachine for "
                           f"machine {found.machine_id} of {found.home}; remove it there or choose another name")

    def _pool(self) -> libvirt.virStoragePool:
        name = self.opts["libvirt_pool"]
        if name == "default" and storage.find_pool(self.conn, name) is None:
            return storage.create_default_pool(self.conn)
        return storage.pool(self.conn, name)

    def _define(self) -> None:
        lv = libvirt_module()
        try:
            self.conn.defineXML(domain.render(self._spec()))
        except lv.libvirtError as e:
            raise MachineError(f"libvirt refused the domain of {self.machine.name}: {message(e)}") from None

    def _boot(self) -> None:
        dom = self._domain()
        if dom is None:
            raise MachineError(f"the domain of {self.machine.name} is gone from libvirt (remove the machine)")
        mac = self.machine.resources["mac"]
        net = None if self._user_net else _network(self.conn, self.opts["libvirt_network"])
        stale = network.leases(net, mac) if net else set()
        lv = libvirt_module()
        try:
            dom.create()
        except lv.libvirtError as e:
            raise MachineError(f"cannot start {self.machine.name}: {message(e)}") from None
        deadline = time.monotonic() + BOOT_TIMEOUT
        try:
            if net is None:
                address = network.LOOPBACK
            else:
                address = network.wait_for_lease(net, mac, stale, BOOT_TIMEOUT, self.is_alive)
            self._settle_address(address)
            endpoint = self.ssh_endpoint()
            network.wait_for_ssh(endpoint.host, endpoint.port, max(deadline - time.monotonic(), 1.0), self.is_alive)
        except MachineError as e:
            raise MachineError(f"{e}; {console_tail(self._console_log)}") from None

    @property
    def _console_log(self) -> Path:
        return self.machine.dir / "console.log"

    def _settle_address(self, address: str) -> None:
        """Record where the guest is now and pin, for that address, the host key its seed carries.

        (`start` tells the user when the engine moved: that is the same for every driver.)
        """
        self.machine.record(ip=address)
        endpoint = self.ssh_endpoint()
        key_type, key_b64 = self.machine.resources["host_key"].split()[:2]
        write_atomic(self.machine.known_hosts_path, f"{endpoint.known_hosts_name} {key_type} {key_b64}\n".encode(),
                     0o600)

    def start(self) -> None:
        dom = self._domain()
        if dom is not None and domain.state(dom) == State.RUNNING:
            return
        # Undefined behind pymachine's back, the domain is defined again from the record: its volumes still
        # hold the machine.
        define = dom is None
        if self._user_net:
            r = self.machine.resources
            if not (network.port_free(r["ssh_port"]) and network.port_free(r["engine_port"])):
                ssh_port, engine_port = network.free_ports(2)  # someone took ours while the machine was off
                self.machine.record(ssh_port=ssh_port, engine_port=engine_port)
                define = True
        if define:
            self._define()
        self._boot()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        dom = self._domain()
        if dom is None or not domain.is_active(dom):
            return
        lv = libvirt_module()
        try:
            dom.shutdown()  # ACPI power button
        except lv.libvirtError as e:
            raise MachineError(f"cannot stop {self.machine.name}: {message(e)}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not domain.is_active(dom):
                return
            time.sleep(0.25)
        self.kill()

    def kill(self) -> None:
        dom = self._domain()
        if dom is not None and domain.is_active(dom):
            lv = libvirt_module()
            try:
                dom.destroy()
            except lv.libvirtError as e:
                if domain.is_active(dom):
                    raise MachineError(f"cannot kill {self.machine.name}: {message(e)}") from None

    def remove(self) -> None:
        each_step(self._undefine, self._delete_volumes)

    def _undefine(self) -> None:
        dom = self._domain()
        if dom is None:
            return
        lv = libvirt_module()
        self.kill()
        flags = (lv.VIR_DOMAIN_UNDEFINE_NVRAM | lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                 | lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | lv.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        try:
            dom.undefineFlags(flags)
        except lv.libvirtError as e:
            raise MachineError(f"cannot undefine the domain of {self.machine.name}: {message(e)}") from None

    def _volumes(self) -> tuple[libvirt.virStoragePool | None, tuple[str, str]]:
        pool_name = self.machine.resources.get("pool", self.opts.get("libvirt_pool"))
        pool = storage.find_pool(self.conn, pool_name) if pool_name else None
        return pool, (self._seed_name, self._disk_name)

    def _delete_volumes(self) -> None:
        pool, names = self._volumes()
        for volume in names if pool is not None else ():
            storage.delete(pool, volume)

    def leftovers(self) -> list[str]:
        try:
            dom = self._domain()
            pool, names = self._volumes()
            left = [f"domain {dom.name()}"] if dom is not None else []
            return left + [f"volume {v}" for v in names if pool is not None and storage.find(pool, v) is not None]
        except MachineError as e:  # libvirtd unreachable: nothing can be said to be gone
            return [f"unknown ({e})"]

    # -- queries ------------------------------------------------------------------------------------------
    def not_running(self) -> MachineError:
        """Why the machine is not running when that is not its power: libvirtd unreachable, its domain gone."""
        try:
            gone = self._domain() is None and "uuid" in self.machine.resources
        except MachineError as e:
            return e
        if gone:
            return MachineError(f"the domain of {self.machine.name} is gone from libvirt (`pymachine start "
                                f"{self.machine.name}` defines it again over its disk)")
        return super().not_running()

    def state(self) -> State:
        lv = libvirt_module()
        try:
            dom = self._domain()
            if dom is None:
                return State.ERROR if "uuid" in self.machine.resources else State.STOPPED
            return domain.state(dom)
        except (MachineError, lv.libvirtError):
            return State.ERROR  # libvirtd unreachable, or the domain vanished while asked: say so in `ls`


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # systemd colours its status lines on a serial console


def console_tail(log: Path) -> str:
    """Where a boot that never reached SSH stopped: the guest console's last line, and where the whole log is."""
    try:
        lines = [line for line in log.read_bytes().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return f"the guest wrote no console log ({log})"
    if not lines:
        return f"the guest's console stayed silent ({log})"
    last = "".join(c for c in _ESCAPES.sub("", lines[-1]) if c.isprintable()).strip()[:200]
    return f"the guest's console last said {last!r} (all of it: {log})"


def resolve_domain_type(conn: libvirt.virConnect, wanted: str) -> str:
    """kvm or qemu: what the user asked for, if libvirt can run it; auto prefers kvm."""
    offered = domain.hvm_types(conn.getCapabilities())
    if wanted == "auto":
        if "kvm" in offered:
            return "kvm"
        wanted = "qemu"
    if wanted not in offered:
        hint = " (is /dev/kvm there and usable?)" if wanted == "kvm" else " (is qemu-system-x86 installed?)"
        raise MachineError(f"libvirt at {conn.getURI()} cannot run {wanted} x86_64 guests{hint}")
    return wanted


def _network(conn: libvirt.virConnect, name: str) -> libvirt.virNetwork:
    lv = libvirt_module()
    try:
        net = conn.networkLookupByName(name)
    except lv.libvirtError as e:
        if is_missing(e):
            raise MachineError(f"libvirt has no network {name!r} (list them with `virsh net-list --all`, or use "
                               f"--libvirt-network user)") from None
        raise MachineError(f"network {name!r}: {message(e)}") from None
    if not net.isActive():
        raise MachineError(f"libvirt network {name!r} is not active (start it with `virsh net-start {name}`)")
    return net


def _available_memory_mib(conn: libvirt.virConnect) -> int | None:
    lv = libvirt_module()
    try:
        stats = conn.getMemoryStats(lv.VIR_NODE_MEMORY_STATS_ALL_CELLS)
    except lv.libvirtError:
        return None  # a hypervisor driver that cannot tell
    if "free" not in stats:
        return None
    return (stats["free"] + stats.get("buffers", 0) + stats.get("cached", 0)) // 1024


DRIVER = LibvirtDriver


def _using_cache(store: Store) -> contextlib.AbstractContextManager[None]:
    return file_lock(store.cache("libvirt") / _PRUNE_LOCK, timeout=_PRUNE_WAIT, what="the libvirt image cache",
                     shared=True)
