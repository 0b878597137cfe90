"""The local driver: a system container (systemd as PID 1) booted by systemd-nspawn.

Each machine is a copy-on-write overlay over a cached base rootfs, with its own network namespace, a
static address on a host bridge with NAPT, its own cgroups, and sshd with a host key generated and pinned
before the first boot. By default (`--local-isolation userns`) it also has a user namespace of its own: its
root is an unprivileged host UID from a range leased to it (drivers/local/userns.py).

What only makes, boots or removes a machine (the rootfs build, layers, user namespaces, keys, templates) is
imported by the methods that do it: `ls`, `ip` and `status` load this driver to read a record and /proc.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from machine.drivers.base import Driver, Option, Pruned, State, each_step
from machine.drivers.local import cgroups
from machine.errors import MachineError, UsageError
from machine.paths import data_dir
from machine.store import Store, write_atomic, writing

if TYPE_CHECKING:
    from machine.drivers.local.network import Network
    from machine.enginecache import PackageSet

_TEMPLATES = data_dir("templates") / "local"
_RELEASE_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")
STOP_TIMEOUT = 30.0
ISOLATIONS = ("userns", "privileged")


def _new_machine_id() -> str:
    """A random UUID (v4), as systemd writes /etc/machine-id (uuid imported here: few commands make a machine)."""
    import uuid

    return uuid.uuid4().hex + "\n"


# Every machine's systemd (and its engine) takes inotify instances charged to the host's root, whose default
# allowance (128) runs out at about 15 running machines: the next one's systemd fails ("Too many open files")
# and never brings its network up. What LXD's production setup asks for; only ever raised.
INOTIFY_LIMITS = {"max_user_instances": 1024, "max_user_watches": 1048576}


def raise_inotify_limits() -> None:
    for name, wanted in INOTIFY_LIMITS.items():
        path = Path("/proc/sys/fs/inotify") / name
        if int(path.read_text()) < wanted:
            path.write_text(f"{wanted}\n")


class LocalDriver(Driver):
    name = "local"
    options = (
        Option("local-release", "Debian release of the base image built with debootstrap", "bookworm"),
        Option("local-mirror", "Debian mirror debootstrap and the machine's apt use", "http://deb.debian.org/debian"),
        Option("local-image", "a rootfs tarball (URL or path) to use instead of debootstrap"),
        Option("local-image-sha256", "expected sha256 of --local-image"),
        Option("local-bridge", "host bridge the machines plug into", "pmbr0"),
        Option("local-subnet", "IPv4 subnet of the bridge; the host is its first address", "10.231.0.0/24"),
        Option("local-isolation", "userns: the machine's root is an unprivileged host UID (its own user "
               "namespace); privileged: the machine's root is the host's root (loop devices, btrfs, zfs)",
               "userns", choices=ISOLATIONS),
        Option("local-engine-layer", "the engine's packages come pre-installed from a layer shared by the "
               "machines of one base (built once, rebuilt when the archive moves on); false: installed per machine",
               True, type=bool),
    )

    # -- checks -------------------------------------------------------------------------------------------
    @classmethod
    def pre_create_check(cls, options: dict[str, Any]) -> None:
        import shutil

        from machine import images
        from machine.drivers.local.network import Network

        Network.parse(options["local_bridge"], options["local_subnet"]).check_free()
        release = options["local_release"]
        if not release or not set(release) <= _RELEASE_CHARS:
            raise UsageError(f"--local-release: {release!r} is not a release name")
        if options["local_image"]:
            images.check_source(options["local_image"], options["local_image_sha256"])
        elif options["local_image_sha256"]:
            raise UsageError("--local-image-sha256 needs --local-image")
        if os.geteuid() != 0:
            raise MachineError("the local driver needs root (it runs systemd-nspawn and configures a bridge)")
        tools = ["systemd-nspawn", "ip", "iptables", "tar" if options["local_image"] else "debootstrap"]
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            raise MachineError(
                f"the local driver needs {', '.join(missing)} on PATH (Debian: apt-get install "
                f"systemd-container debootstrap iptables iproute2)"
            )

    @classmethod
    def check_engine(cls, options: dict[str, Any], engine: dict[str, Any]) -> None:
        from machine.provision import DEVICE_STORAGE_DRIVERS

        if options.get("local_isolation") != "userns":
            return
        storage = engine.get("engine_storage_driver", "")
        if engine.get("engine_storage_device"):
            raise UsageError("--engine-storage-device: a machine with --local-isolation userns cannot use block "
                             "devices; add --local-isolation privileged")
        # These need loop or block devices (mknod, losetup, mounting a block filesystem), which the kernel grants
        # only to the host's root.
        if storage in DEVICE_STORAGE_DRIVERS:
            raise UsageError(f"--engine-storage-driver {storage}: a machine with --local-isolation userns cannot "
                             f"mount loop devices; add --local-isolation privileged, or use overlay2")

    # -- paths and records --------------------------------------------------------------------------------
    @property
    def _network(self) -> Network:
        from machine.drivers.local.network import Network

        return Network.parse(self.opts["local_bridge"], self.opts["local_subnet"])

    @property
    def _unit(self) -> str:
        # Unique per machine across homes; also names the host side of the veth (vb-pm-xxxxxxxx, <= 15 chars).
        return f"pm-{self.machine.id}"

    def _layer(self, part: str) -> Path:
        return self.machine.dir / "layer" / part

    # -- the engine cache (machine/enginecache.py) ---------------------------------------------------------
    @classmethod
    def prune_cache(cls, store: Store, everything: bool, dry_run: bool) -> list[Pruned]:
        from machine.drivers.local import layers, rootfs

        cache = store.cache_dir / "local"
        gone = layers.prune(cache, everything, dry_run)
        # Layers first: a base stays while a layer built on it does. The store's machines are asked too, as
        # machines made before bases were marked have no mark in theirs.
        needed = layers.bases(cache, leaving={path for path, _ in gone}) | _recorded_bases(store)
        return ([Pruned(f"engine layer {path.parent.name}/{path.name}", size) for path, size in gone]
                + [Pruned(f"base image {path.name}", size)
                   for path, size in rootfs.prune(cache, everything, dry_run, needed)])

    def prepare_packages(self, packages: PackageSet) -> None:
        from machine.drivers.local import layers

        if not self.opts["local_engine_layer"]:
            return
        for _ in range(3):  # a prune may remove the layer between finding it and marking it used: find it again
            engine_layer = layers.layer(self.store.cache("local"), self._base, packages)
            # Recorded first: rm takes the mark out even when a create dies right after making it.
            self.machine.record(engine_layer=str(engine_layer))
            if layers.add_user(engine_layer, self.machine.dir):
                return  # start() mounts the recorded layer
        raise MachineError(f"the engine layer of {packages.name} was pruned while this create used it: run it again")

    def refresh_packages(self, packages: PackageSet) -> None:
        from machine.drivers.local import layers

        base = self.machine.resources.get("base")
        if self.opts["local_engine_layer"] and base:
            layers.layer(self.store.cache("local"), Path(base), packages, recheck=True)

    # -- lifecycle ----------------------------------------------------------------------------------------
    @functools.cached_property
    def _base(self) -> Path:
        """The base rootfs (built, or an image fetched and unpacked, on first use), marked as this machine's:
        asked once per command."""
        from machine.drivers.local import rootfs

        o = self.opts
        for _ in range(3):  # a prune may remove the base between finding it and marking it used: find it again
            base = rootfs.base_rootfs(self.store.cache("local"), o["local_release"], o["local_mirror"],
                                      o["local_image"], o["local_image_sha256"])
            self.machine.record(base=str(base))  # first: rm takes the mark out even when a create dies after it
            if rootfs.add_user(base, self.machine.dir):
                if not base.is_dir():  # deleted by hand, or lost on a damaged disk: nothing could boot over it
                    raise MachineError(f"the base image {base.parent} has lost its rootfs: remove it (`pymachine "
                                       f"cache prune --all`, once no machine uses it) and create again to rebuild it")
                return base
        raise MachineError("the base image was pruned while this create used it: run it again")

    def create(self) -> None:
        from machine.drivers.local import rootfs, userns

        o = self.opts
        base = self._base  # built (or found), recorded and marked as this machine's: start() mounts it
        for part in ("upper", "work", "root", *(f"volumes/{name}" for name in rootfs.ENGINE_VOLUMES)):
            self._layer(part).mkdir(parents=True, exist_ok=True, mode=0o755)
        address = self._network.lease(str(self.machine.dir))
        self.machine.record(ip=address)
        shift = None
        if o["local_isolation"] == "userns":
            shift = userns.lease(str(self.machine.dir))
            self.machine.record(uid_range=[shift, userns.RANGE])
        self._write_identity(base, address)
        if shift is not None:
            # Stored in the machine's range: its root owns its files, and the engine's data.
            userns.shift_tree(self._layer("upper"), shift)
            for name in rootfs.ENGINE_VOLUMES:
                os.chown(self._layer(f"volumes/{name}"), shift, shift)
        self.start()

    def _write_identity(self, base: Path, address: str) -> None:
        """Files that make the shared base this machine: name, address, keys, pinned host key."""
        from machine import sshkeys, templating
        from machine.drivers.local import rootfs
        from machine.drivers.local.network import host_nameservers

        upper, net, name = self._layer("upper"), self._network, self.machine.name
        env = templating.environment(_TEMPLATES)
        nameservers = host_nameservers()
        files = {
            "etc/hostname": f"{name}\n",
            "etc/hosts": env.get_template("hosts.j2").render(hostname=name),
            "etc/machine-id": _new_machine_id(),
            "etc/resolv.conf": env.get_template("resolv.conf.j2").render(nameservers=nameservers),
            "etc/systemd/network/10-pymachine-host0.network": env.get_template("host0.network.j2").render(
                bridge=net.bridge, address=address, prefixlen=net.subnet.prefixlen, gateway=net.gateway,
                nameservers=nameservers,
            ),
        }
        host_key = sshkeys.new_keypair(f"root@{name}")
        user_key = sshkeys.public_line(self.machine.key_path.read_bytes(), f"pymachine@{name}")
        secret = {
            "etc/ssh/ssh_host_ed25519_key": host_key.private_openssh.decode(),
            "etc/ssh/ssh_host_ed25519_key.pub": host_key.public_line + "\n",
            "root/.ssh/authorized_keys": user_key + "\n",
        }
        for name in rootfs.ENGINE_VOLUMES:  # the volumes' mount points, made here rather than by nspawn as root
            _mkdirs_like(base, upper, Path(rootfs.VOLUMES_DIR.lstrip("/"), name))
        for rel, text in [*files.items(), *secret.items()]:
            path = upper / rel
            _mkdirs_like(base, upper, Path(rel).parent)
            path.unlink(missing_ok=True)  # resolv.conf may be a symlink in the base
            with writing(path):
                path.write_text(text)
            path.chmod(0o600 if rel in secret and not rel.endswith(".pub") else 0o644)
        (upper / "root/.ssh").chmod(0o700)  # sshd's StrictModes
        key_type, key_b64 = host_key.public_line.split()[:2]
        write_atomic(self.machine.known_hosts_path, f"{address} {key_type} {key_b64}\n".encode(), 0o600)

    def start(self) -> None:
        from machine.drivers.local import userns

        if self.state() == State.RUNNING:
            return
        address = self.machine.resources.get("ip")
        if address is None:
            raise MachineError(f"machine {self.machine.name!r} was never fully created (it has no address): remove "
                               f"it with `pymachine rm -f {self.machine.name}`")
        # A boot whose nspawn died (killed, say) leaves the machine's own processes running, holding its overlay,
        # network namespace and veth: booted again beside them, it would find its veth taken and never come up.
        self._cleanup_processes()
        leased = self._network.lease(str(self.machine.dir), wanted=address)
        if leased != address:
            self._network.release(str(self.machine.dir))
            raise MachineError(f"address {address} of {self.machine.name} was taken by another machine")
        # A machine is user-namespaced when its create leased it a range (not by the option: a machine made
        # before the option existed reads its default).
        shift = self._uid_shift()
        # Lower layers, top first: the engine layer (if the machine was made with one) over the base.
        sources = [p for p in (self.machine.resources.get("engine_layer"), self.machine.resources["base"]) if p]
        missing = next((p for p in sources if not Path(p).is_dir()), None)
        if missing:
            raise MachineError(f"{self.machine.name} is made over {missing}, which is gone from the image cache: "
                               f"remove it with `pymachine rm {self.machine.name}`")
        lowers, trees = sources, []
        try:
            if shift is not None:
                userns.lease(str(self.machine.dir), wanted=shift)  # still its own (raises if not)
                # First: a base that cannot be idmapped changes nothing.
                trees = [userns.idmapped_tree(source, shift) for source in sources]
                lowers = [str(self._layer("lower" if i == len(sources) - 1 else f"lower{i}"))
                          for i in range(len(sources))]
            self._boot(shift, lowers, trees)
        finally:
            for tree in trees:
                os.close(tree)

    def _boot(self, shift: int | None, lowers: list[str], trees: list[int]) -> None:
        """Start the supervisor in the machine's cgroups and a mount namespace of its own (with `trees`, the
        idmapped lower layers, mounted on `lowers`), booting the machine with nspawn."""
        import subprocess

        from machine.drivers.local import rootfs, userns

        raise_inotify_limits()
        paths = cgroups.paths(self.machine.id)
        self.machine.record(cgroups=paths)
        cgroups.create(paths)
        if shift is not None:
            cgroups.delegate(paths, shift)
            for lower in lowers:
                Path(lower).mkdir(exist_ok=True)
        env = {
            **os.environ,
            "PM_LOWER": ":".join(lowers),
            "PM_UPPER": str(self._layer("upper")),
            "PM_WORK": str(self._layer("work")),
            "PM_ROOT": str(self._layer("root")),
        }
        nspawn = [
            "--boot", "--register=no", "--keep-unit", "--quiet",
            f"--machine={self._unit}", f"--hostname={self.machine.name}",
            f"--directory={self._layer('root')}", f"--network-bridge={self._network.bridge}",
            "--resolv-conf=off", "--link-journal=no", "--console=passive",
            # What a container engine inside needs: all capabilities (in a user namespace, over its own
            # namespaces only), keyrings and BPF (runc uses both).
            "--capability=all", "--system-call-filter=@keyring bpf",
            # Plain binds in both modes: the volumes hold the machine's own UIDs (an idmapped bind would store
            # its root's files as the host's root, and a setuid file made inside would be setuid-root here).
            *(f"--bind={self._layer('volumes/' + name)}:{rootfs.VOLUMES_DIR}/{name}" for name in rootfs.ENGINE_VOLUMES),
            *self._devices(shift),
        ]
        if shift is not None:
            nspawn += [f"--private-users={shift}:{userns.RANGE}", "--private-users-ownership=off"]

        def enter() -> None:
            # In the child, before it execs the supervisor: born inside the machine's cgroups (a kill at any
            # moment leaves no process that rm cannot find), in a mount namespace of its own (the overlay and
            # the idmapped base vanish with it).
            cgroups.join(paths)
            userns.private_mount_namespace()
            for tree, lower in zip(trees, lowers, strict=False):
                userns.attach(tree, lower)

        with (self.machine.dir / "console.log").open("ab") as log:
            try:
                proc = subprocess.Popen(
                    ["sh", str(_TEMPLATES / "supervisor.sh"), *nspawn],
                    env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                    preexec_fn=enter,
                )
            except (OSError, subprocess.SubprocessError) as e:  # subprocess names no step of `enter`
                raise MachineError(f"cannot start {self.machine.name}: joining its cgroups, making its mount "
                                   f"namespace or mounting its base failed ({e})") from None
        self.machine.record(pid=proc.pid, pid_start=_start_time(proc.pid))

    def _uid_shift(self) -> int | None:
        uid_range = self.machine.resources.get("uid_range")
        return int(uid_range[0]) if uid_range else None

    def _devices(self, shift: int | None) -> list[str]:
        """nspawn flags passing devices in: fuse-overlayfs (a storage driver, and rootless engines) needs FUSE,
        a btrfs or zfs loop file the loop devices (templates/local/loop-devices.service makes their nodes)."""
        if shift is None:
            return [f"--bind={dev}" for dev in ("/dev/fuse", "/dev/loop-control") if Path(dev).exists()]
        if not Path("/dev/fuse").exists():
            return []
        # The host's /dev/fuse is root's alone (0600): a node of the machine's own, which FUSE allows anyone.
        fuse = self._layer("dev/fuse")
        if not fuse.exists():
            fuse.parent.mkdir(exist_ok=True)
            os.mknod(fuse, 0o666 | stat.S_IFCHR, os.makedev(10, 229))
            fuse.chmod(0o666)
        return [f"--bind={fuse}:/dev/fuse"]

    def _supervisor(self) -> int | None:
        """The supervisor's PID while it runs (PIDs get reused, so its start time must match too)."""
        pid = self.machine.resources.get("pid")
        if pid and _start_time(pid) == self.machine.resources.get("pid_start"):
            return pid
        return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        pid = self._supervisor()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # nspawn turns this into an orderly poweroff
            deadline = time.monotonic() + timeout
            while self._supervisor() is not None and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.05)
        self._cleanup_processes()

    def kill(self) -> None:
        self._cleanup_processes()

    def _cleanup_processes(self) -> None:
        self._kill_processes()
        self._remove_cgroups()

    def _kill_processes(self) -> None:
        cgroups.kill_all(self.machine.resources.get("cgroups", []))
        pid = self.machine.resources.get("pid")
        if pid:
            _reap(pid)

    def _remove_cgroups(self) -> None:
        cgroups.remove(self.machine.resources.get("cgroups", []))

    def remove(self) -> None:
        import shutil

        try:
            self._kill_processes()
        except MachineError as e:
            # Processes that survive keep running as this machine: its address, its UID range and its files
            # must not go to the next machine while they do.
            raise MachineError(f"{e}; its address, UID range and files are kept until they are gone") from None
        try:
            each_step(self._remove_cgroups, self._release_address, self._release_uids, self._leave_engine_layer,
                      self._leave_base)
        finally:
            shutil.rmtree(self.machine.dir / "layer", ignore_errors=True)

    def _release_address(self) -> None:
        # By owner, not by the recorded address: a create killed between leasing and recording leased one too.
        self._network.release(str(self.machine.dir))

    def _leave_engine_layer(self) -> None:
        # Only the mark: the layer is shared, and only a prune of the cache removes it.
        from machine.drivers.local import layers

        engine_layer = self.machine.resources.get("engine_layer")
        if engine_layer:
            layers.remove_user(Path(engine_layer), self.machine.dir)

    def _leave_base(self) -> None:
        from machine.drivers.local import rootfs

        base = self.machine.resources.get("base")
        if base:
            rootfs.remove_user(Path(base), self.machine.dir)

    def _release_uids(self) -> None:
        # By owner too, and whatever the option says: a create killed before recording its range leased one.
        from machine.drivers.local import userns

        userns.release(str(self.machine.dir))

    def leftovers(self) -> list[str]:
        from machine.drivers.local import userns

        paths = self.machine.resources.get("cgroups", [])
        pids, groups = sorted(cgroups.processes(paths)), cgroups.existing(paths)
        left = [f"{len(pids)} processes"] if pids else []
        left += [f"{len(groups)} cgroups (pymachine/{self.machine.id})"] if groups else []
        address = self._network.leased_to(str(self.machine.dir))
        if address:
            left.append(f"address {address} on {self._network.bridge}")
        first = userns.leased_to(str(self.machine.dir))
        if first is not None:
            left.append(f"UID range {first}-{first + userns.RANGE - 1}")
        return left

    # -- queries ------------------------------------------------------------------------------------------
    def state(self) -> State:
        if self._supervisor() is not None:
            return State.RUNNING
        if cgroups.processes(self.machine.resources.get("cgroups", [])):
            # Its nspawn died, and its own processes live on (sshd answering on its address): neither running nor
            # stopped; `stop` ends them, `start` too before it boots the machine again.
            return State.ERROR
        return State.STOPPED



def _recorded_bases(store: Store) -> set[Path]:
    """The base rootfs each local machine of `store` records."""
    found = set()
    for name in store.names():
        with contextlib.suppress(MachineError):  # a damaged record: its machine cannot start anyway
            machine = store.load(name)
            if machine.driver == "local" and machine.resources.get("base"):
                found.add(Path(machine.resources["base"]))
    return found


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None  # a zombie has already stopped
    return int(fields[19])


def _mkdirs_like(base: Path, upper: Path, rel: Path) -> None:
    """Create upper/rel with the modes of base/rel: an upper directory's attributes win in the overlay."""
    for depth in range(1, len(rel.parts) + 1):
        part = Path(*rel.parts[:depth])
        target = upper / part
        if not target.exists():
            source = base / part
            mode = source.stat().st_mode & 0o7777 if source.is_dir() else 0o755
            target.mkdir()
            target.chmod(mode)


def _reap(pid: int) -> None:
    # The supervisor is our child only within the command that started it; reap it there.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


DRIVER = LocalDriver
