"""The read-only base root filesystem that every local machine overlays.

Built once with debootstrap (or unpacked from a user's tarball), keyed by everything that went into it,
under a lock so that parallel creates build it once, and published with an atomic rename. The machines that use
a base are marked in it (drivers/local/marks.py); prune() removes the bases nothing uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Collection
from pathlib import Path

from machine import images, templating, ui
from machine.drivers.local import marks
from machine.errors import MachineError
from machine.paths import data_dir
from machine.store import disk_usage, file_lock

# Bump when the recipe below changes, so old caches are not reused for a different result.
RECIPE = 10
DIR = "rootfs"  # in the cache: one directory per base (rootfs/, users/, RECIPE_FILE, READY last)
RECIPE_FILE = "recipe.json"
READY = "complete"
LOOP_DEVICES = 64
PACKAGES = (
    "systemd-sysv", "dbus", "openssh-server", "iproute2", "ca-certificates", "python3", "sudo", "kmod",
    "gnupg", "curl",
)
_TEMPLATES = data_dir("templates") / "local"
# Engines keep images in copy-on-write layers of their own, and overlayfs cannot stack its upper layer on
# the machine's overlayfs root: their data roots are host directories, bound in under VOLUMES_DIR.
ENGINE_VOLUMES = {"docker": "/var/lib/docker", "containers": "/var/lib/containers"}
VOLUMES_DIR = "/var/lib/pymachine/volumes"


def debootstrap_key(release: str, mirror: str) -> str:
    """The name in the cache of the base debootstrap builds of `release` from `mirror` with this recipe."""
    recipe = {"recipe": RECIPE, "release": release, "mirror": mirror, "packages": PACKAGES}
    return f"{release}-" + hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def base_rootfs(
    cache: Path, release: str, mirror: str, image: str | None = None, image_sha256: str | None = None
) -> Path:
    """Return the cached base rootfs for these inputs, making it if needed."""
    tarball = images.fetch(image, cache / "images", image_sha256) if image else None
    key = "image-" + tarball.name[:16] if tarball else debootstrap_key(release, mirror)
    root = cache / DIR / key
    if (root / READY).exists():
        return root / "rootfs"
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        if (root / READY).exists():
            return root / "rootfs"
        staging = root.parent / f".{key}.build"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        what = f"unpacking {image}" if tarball else f"building the {release} base image with debootstrap (once)"
        try:
            with ui.long_step(what) as step:
                if tarball:
                    _run(["tar", "--numeric-owner", "--xattrs", "-xpf", str(tarball), "-C", str(staging / "rootfs")],
                         mkdir=staging / "rootfs")
                else:
                    # debootstrap's `I: Retrieving libc6 2.36-9`, `I: Unpacking …`: how far the build has got.
                    # In a mount namespace of its own: the proc and sysfs it mounts in the rootfs go with it,
                    # even when it is killed before its exit trap unmounts them.
                    _run(["unshare", "--mount", "--propagation", "private", "debootstrap", "--variant=minbase",
                          "--include=" + ",".join(PACKAGES), release, str(staging / "rootfs"), mirror],
                         report=step.report)
                _customise(staging / "rootfs")
            if not tarball:  # what prune() tells a base of an older recipe by (an image's key has no recipe)
                (staging / RECIPE_FILE).write_text(json.dumps({"recipe": RECIPE}))
            (staging / READY).touch()
            os.rename(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return root / "rootfs"


def add_user(base: Path, machine_dir: Path) -> bool:
    """Mark the base rootfs `base` as used by the machine in `machine_dir` (prune keeps it while that directory
    exists); False when a prune removed it since base_rootfs() returned it (ask base_rootfs() again)."""
    return marks.add(base.parent, READY, machine_dir, _marks_lock(base.parent))


def remove_user(base: Path, machine_dir: Path) -> None:
    marks.remove(base.parent, machine_dir)


def prune(cache: Path, everything: bool = False, dry_run: bool = False, needed: Collection[Path] = ()
          ) -> list[tuple[Path, int]]:
    """Remove the bases no existing machine uses (its marks) and `needed` does not name (base rootfs paths: the
    engine layers left, machines made before bases were marked) that an older recipe built (with `everything`,
    every one: the next create builds it again), and what interrupted builds left; return what was removed and the
    bytes it held (with `dry_run`, what would be, and nothing is). A base of the current recipe stays: the next
    create with its release and mirror uses it, and so does one whose recipe is not recorded (built before it was),
    or a user's image."""
    removed: list[tuple[Path, int]] = []
    top = cache / DIR
    # A base linked in from another cache belongs to that cache.
    for entry in sorted(p for p in top.iterdir() if p.is_dir() and not p.is_symlink()) if top.is_dir() else []:
        staging = entry.name.startswith(".") and entry.name.endswith(".build")
        root = entry.with_name(entry.name[1:-len(".build")]) if staging else entry
        with _build_lock(root):  # a build in progress finishes first; a staging directory left now is debris
            if not entry.is_dir() or not (staging or everything or _superseded(root)):
                continue
            with _marks_lock(root):  # a create marking it now either comes first or finds it gone
                if not staging and (marks.in_use(root) or root / "rootfs" in needed):
                    continue
                removed.append((entry, disk_usage(entry)))
                if not dry_run:
                    (entry / READY).unlink(missing_ok=True)  # what add_user() looks for
                    shutil.rmtree(entry)
    return removed


def _superseded(root: Path) -> bool:
    try:
        return json.loads((root / RECIPE_FILE).read_text())["recipe"] != RECIPE
    except (OSError, ValueError, KeyError, TypeError):
        return False  # built before recipes were recorded, or a user's image: only --all removes it


def _build_lock(root: Path) -> contextlib.AbstractContextManager[None]:
    return file_lock(root.parent / f"{root.name}.lock", timeout=3600, what=f"base image {root.name}")


def _marks_lock(root: Path) -> contextlib.AbstractContextManager[None]:
    return marks.lock(root.parent / f"{root.name}.users.lock", f"base image {root.name}")


def _run(cmd: list[str], mkdir: Path | None = None, report: Callable[[str], None] | None = None) -> None:
    """Run `cmd`, passing each `I: …` line it prints (debootstrap's steps) to `report`; a failure is its last
    line of output."""
    if mkdir is not None:
        mkdir.mkdir()
    last = "no output"
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          start_new_session=True) as proc:
        try:
            for line in proc.stdout or ():
                if not line.strip():
                    continue
                last = line.strip()
                if report is not None and last.startswith("I: "):
                    report(last[3:])
        except BaseException:  # Ctrl-C (raised in this worker thread): no build goes on behind the user's back,
            _kill_group(proc.pid)  # nor any of its children (dpkg, wget)
            raise
    if proc.returncode != 0:
        raise MachineError(f"{cmd[0]} failed (exit {proc.returncode}): {last}")


def _kill_group(pgid: int, timeout: float = 5.0) -> None:
    """SIGKILL the process group, and return once none of it runs any more: a killed process lives on until the
    scheduler delivers the signal, and the staging directory is removed next."""
    os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _group_runs(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _group_runs(pgid: int) -> bool:
    """Whether a process of group `pgid` is alive (a zombie is not: it only waits for whoever reaps it)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]  # after the name, which may hold spaces
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(group) == pgid and state not in "ZX":
            return True
    return False


def _customise(root: Path) -> None:
    """Make any Debian-like rootfs a pymachine base: no shared identity, key-only sshd, networkd."""
    for needed in ("usr/sbin/sshd", "lib/systemd/systemd"):
        if not (root / needed).exists():
            raise MachineError(f"the image has no /{needed}; a local machine needs systemd and openssh-server")
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    _install(root, "etc/ssh/sshd_config.d/pymachine.conf", "sshd.conf")
    _install(root, "etc/systemd/journald.conf.d/pymachine.conf", "journald.conf")
    _install(root, "etc/systemd/system/pymachine-cgroup-delegate.service", "cgroup-delegate.service")
    _install(root, "etc/systemd/system/pymachine-loop-devices.service", "loop-devices.service")
    _write(root / "usr/lib/pymachine/loop-devices.conf", _render("loop-devices.conf.j2", count=LOOP_DEVICES))
    _install(root, "etc/systemd/system/ssh.service.d/pymachine.conf", "ssh-boot.conf")
    _no_login_motd(root)
    mark_up_to_date(root)
    mounts = [_engine_data_mount(root, name, where) for name, where in ENGINE_VOLUMES.items()]
    _run(["systemctl", "--root", str(root), "enable", "systemd-networkd", "ssh",
          "pymachine-cgroup-delegate.service", "pymachine-loop-devices.service", *mounts])
    # Units that only cost boot time in a container (which can neither load modules nor mount these), and
    # logind, which the engines do not use: it costs a boot ~0.5 s of CPU when eight start at once, and every
    # first login after a pause 0.2-1 s to start root's systemd user manager (pam_systemd goes on without it).
    _run(["systemctl", "--root", str(root), "mask", "e2scrub_reap.service", "systemd-networkd-wait-online.service",
          "systemd-logind.service", "systemd-network-generator.service",
          *(f"modprobe@{m}.service" for m in ("configfs", "dm_mod", "drm", "efi_pstore", "fuse", "loop")),
          "dev-hugepages.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
          "sys-fs-fuse-connections.mount"])


def _no_login_motd(root: Path) -> None:
    """Turn off PAM's message of the day for SSH logins: Debian's pam_motd runs the /etc/update-motd.d scripts
    (a shell, run-parts, uname) at every session: ~5 ms of a machine's CPU per provisioning run, for a banner
    only an interactive login would show."""
    pam = root / "etc/pam.d/sshd"
    if pam.is_file():
        lines = pam.read_text().splitlines(keepends=True)
        pam.write_text("".join(f"# {line}" if "pam_motd.so" in line and not line.lstrip().startswith("#")
                               else line for line in lines))


def mark_up_to_date(root: Path) -> None:
    """Mark `root`'s /etc and /var as updated for its /usr, as systemd-update-done would. Otherwise every boot runs
    systemd's update units (sysusers, ldconfig, the hwdb and journal catalog), and sysusers is on the way to sshd
    (networkd waits for it): work the packages' own scripts did when they were installed into `root`."""
    usr = (root / "usr").stat().st_mtime_ns
    for directory in ("etc", "var"):
        stamp = root / directory / ".updated"
        # systemd compares the stamp's mtime with /usr's (and its TIMESTAMP_NSEC line where mtimes are coarse).
        stamp.write_text(f"# Written by pymachine, as systemd-update-done would.\nTIMESTAMP_NSEC={usr}\n")
        os.utime(stamp, ns=(usr, usr))


def _engine_data_mount(root: Path, name: str, where: str) -> str:
    """A vendor mount unit binding the volume the driver passes in (VOLUMES_DIR/name) onto `where`."""
    unit = where.strip("/").replace("/", "-") + ".mount"
    _write(root / "lib/systemd/system" / unit,
           _render("engine-data.mount.j2", what=f"{VOLUMES_DIR}/{name}", where=where, unit=unit))
    return unit


def _render(template: str, **values: object) -> str:
    return templating.environment(_TEMPLATES, strict=False).get_template(template).render(**values)


def _write(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def _install(root: Path, dest: str, template: str) -> None:
    _write(root / dest, (_TEMPLATES / template).read_text())
