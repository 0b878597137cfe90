"""The engine cache: a shared, read-only layer of pre-installed packages between a machine's base and its upper.

A local machine's root is an overlay of its own upper layer over `lowerdir=LAYER:BASE`, where LAYER holds what
`apt-get install` of a package set (machine/enginecache.py: what provisioning will install) wrote over the base.
Layers live in the image cache, `engine-layers/<base>-<hash of the package names>/` (a "slot"), one immutable
directory per build (a "generation": `rootfs/`, `manifest.json`, `users/`), and `current.json` names the one new
machines get and when the archive was last asked about it.

- Keyed by the base image, the package names (which the engine, its install method decide) and the versions
  the archive offers: every package `apt-get install` would bring, with its version, recorded in the manifest.
  The archive is asked at most once a day (as the engine role's apt task refreshes its lists), and at once by
  `upgrade`; when an answer differs from the manifest, a new generation is built and becomes current.
- Built under the slot's lock in `.build-*` and published by rename, so a concurrent create waits for it and
  never sees half a layer. A generation is never changed or removed while a machine uses it (`users/` names the
  machine directories); `rm` takes its name out. A new generation removes those it supersedes that no
  machine uses; `prune()` (`pymachine cache prune`) removes the rest no machine uses.
- No identity: the build runs in a throwaway container without a boot, so no host key, machine-id, engine key,
  certificate or daemon.json is ever made, and what the build's container itself wrote (hostname, hosts,
  resolv.conf, logs, apt's download cache) is taken out before publishing. Each machine still writes its own.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Collection
from pathlib import Path

from machine import ui
from machine.drivers.local import marks
from machine.drivers.local.rootfs import mark_up_to_date
from machine.enginecache import PackageSet, Repository
from machine.errors import MachineError
from machine.store import disk_usage, file_lock, write_atomic

DIR = "engine-layers"
RECIPE = 5  # bump when the build below changes what a layer holds
VALID_FOR = 86400.0  # seconds between two questions to the archive (the engine role's cache_valid_time)
BUILD_TIMEOUT = 3600.0
# What the build's throwaway container, apt and dpkg write that is about that run and not about the packages.
STRIP = (
    "etc/hostname", "etc/hosts", "etc/resolv.conf", "etc/machine-id", "var/lib/dbus/machine-id",
    "var/lib/systemd/random-seed", "etc/ssh/ssh_host_*", "etc/docker/key.json", "etc/docker/daemon.json",
    "root/.ssh", "var/lib/docker", "var/lib/containers", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
    "var/cache/apt/archives/partial",
    "var/cache/debconf/*-old", "var/lib/apt/lists/partial",
)
# The engine's start at boot, which the package enabled, waits for its configuration: a machine made from the
# layer would start it with the package's settings, only for provisioning to restart it with its own. The unit
# stays enabled (enabling it again would cost every create ~0.5 s: systemctl reloads systemd), and a placeholder
# of the engine role's drop-in holds it back until the role writes the real one (after daemon.json).
HELD_BACK = ("systemd/system/docker.service", "etc/systemd/system/docker.service.d/pymachine.conf", """\
# pymachine's engine layer: replaced by the engine role's drop-in when the machine is provisioned.
[Unit]
ConditionPathExists=/etc/docker/daemon.json
""")
# Directories whose files are the build's (logs, temporary files): emptied, kept (apt and dpkg log into them).
EMPTIED = ("var/log", "tmp", "var/tmp")
# Same options as the engine role's apt task (machine/roles/modules/packages.py), so the layer holds what it would.
_APT_INSTALL = "apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold install"
_APT_STAMP = "/var/lib/apt/periodic/update-success-stamp"  # the apt task's "lists refreshed at" stamp
# The builder's overlay bookkeeping: meaningless in another stack (whiteouts and opaque directories stay).
_BUILD_XATTRS = ("trusted.overlay.origin", "trusted.overlay.impure")


def layer(cache: Path, base: Path, packages: PackageSet, recheck: bool = False) -> Path:
    """The current layer (its rootfs) of `packages` over `base`, built when missing; asked against the archive
    when the last answer is older than VALID_FOR, or with `recheck`, and rebuilt when the archive moved on."""
    started = time.time()
    known = None if recheck else fresh(cache, base, packages)
    if known is not None:
        return known
    slot = _slot(cache, base, packages)
    slot.mkdir(parents=True, exist_ok=True)
    with file_lock(slot.parent / f"{slot.name}.lock", timeout=BUILD_TIMEOUT, what=f"engine layer {slot.name}"):
        current = _current(slot)  # another create may have built or checked it while this one waited
        if current and current[1] >= (started if recheck else started - VALID_FOR):
            return current[0] / "rootfs"
        for leftover in slot.glob(".build-*"):  # an interrupted build's (the lock says none is running)
            shutil.rmtree(leftover, ignore_errors=True)
        return _check_or_build(slot, base, packages, current[0] if current else None) / "rootfs"


def current(cache: Path, base: Path, packages: PackageSet) -> Path | None:
    """The current layer (its rootfs), however long ago the archive was asked about it, or None."""
    found = _current(_slot(cache, base, packages))
    return found[0] / "rootfs" if found else None


def fresh(cache: Path, base: Path, packages: PackageSet) -> Path | None:
    """The current layer (its rootfs) when the archive was asked about it less than VALID_FOR ago, else None."""
    found = _current(_slot(cache, base, packages))
    return found[0] / "rootfs" if found and time.time() - found[1] < VALID_FOR else None


def add_user(rootfs: Path, machine_dir: Path) -> bool:
    """Mark the layer as used by the machine in `machine_dir` (prune keeps it while that directory exists); False
    when a prune removed it since `layer()` returned it (ask `layer()` again)."""
    return marks.add(rootfs.parent, "manifest.json", machine_dir, _marks_lock(rootfs.parents[1]))


def remove_user(rootfs: Path, machine_dir: Path) -> None:
    """The machine is gone: the layer stays (other machines, the next create), only the mark goes."""
    marks.remove(rootfs.parent, machine_dir)


def bases(cache: Path, leaving: Collection[Path] = ()) -> set[Path]:
    """The base rootfs every generation of the cache was built on, but the generations in `leaving`."""
    recorded = (manifest(generation) for generation in (cache / DIR).glob("*/*") if generation not in leaving)
    return {Path(record["base"]) for record in recorded if "base" in record}


def prune(cache: Path, everything: bool = False, dry_run: bool = False) -> list[tuple[Path, int]]:
    """Remove the generations no existing machine uses that are no longer current (with `everything`, the
    current ones too: the next create builds them again) and what interrupted builds left; return what was
    removed and the bytes it held (with `dry_run`, what would be, and nothing is)."""
    removed: list[tuple[Path, int]] = []
    top = cache / DIR
    for slot in sorted(p for p in top.iterdir() if p.is_dir()) if top.is_dir() else []:
        with file_lock(top / f"{slot.name}.lock", timeout=BUILD_TIMEOUT, what=f"engine layer {slot.name}"):
            removed += _prune_slot(slot, everything, dry_run)
    return removed


def _prune_slot(slot: Path, everything: bool, dry_run: bool) -> list[tuple[Path, int]]:
    """prune() of one slot, whose lock the caller holds."""
    removed = []
    current = _current(slot)
    for entry in sorted(slot.iterdir()):
        if entry.name.startswith(".build-"):  # builds hold the slot's lock: this one was interrupted
            removed.append((entry, disk_usage(entry)))
            if not dry_run:
                shutil.rmtree(entry, ignore_errors=True)
            continue
        if not entry.is_dir() or (not everything and current is not None and entry == current[0]):
            continue
        with _marks_lock(slot):  # a create marking it now either comes first or sees it gone
            if marks.in_use(entry):
                continue
            removed.append((entry, disk_usage(entry)))
            if not dry_run:
                (entry / "manifest.json").unlink(missing_ok=True)  # what add_user() looks for
                shutil.rmtree(entry)
    if not dry_run and _current(slot) is None:
        (slot / "current.json").unlink(missing_ok=True)
    if not dry_run and not any(slot.iterdir()):
        slot.rmdir()
    return removed


# -- the slot and its generations -------------------------------------------------------------------------
def _slot(cache: Path, base: Path, packages: PackageSet) -> Path:
    # The base's cache key (its directory's name) already says release, mirror and recipe, or the image's hash.
    inputs = {"recipe": RECIPE, "base": base.parent.name, "apt": sorted(packages.apt)}
    if packages.repository is not None:  # only then: the keys of layers without one stay what they were
        inputs["repository"] = [packages.repository.url, packages.repository.channel]
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return cache / DIR / f"{base.parent.name}-{packages.name}-{digest}"


def _current(slot: Path) -> tuple[Path, float] | None:
    """(the current generation, when the archive was last asked about it), or None (none, or a damaged record:
    the next create builds again, which is safe)."""
    try:
        record = json.loads((slot / "current.json").read_text())
        generation = slot / record["generation"]
        checked = float(record["checked"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (generation, checked) if (generation / "manifest.json").is_file() else None


def manifest(generation: Path) -> dict:
    """What a generation's build recorded (its packages and versions, when it was built); {} if unreadable."""
    try:
        return json.loads((generation / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _set_current(slot: Path, generation: Path) -> None:
    record = {"generation": generation.name, "checked": time.time()}
    write_atomic(slot / "current.json", json.dumps(record).encode(), 0o644)


def _marks_lock(slot: Path) -> contextlib.AbstractContextManager[None]:
    return marks.lock(slot.parent / f"{slot.name}.users.lock", f"engine layer {slot.name}")


# -- building ---------------------------------------------------------------------------------------------
def _check_or_build(slot: Path, base: Path, packages: PackageSet, current: Path | None) -> Path:
    """Ask the archive what installing `packages` over `base` brings now; keep `current` when it says the same,
    else build a new generation and make it current. The caller holds the slot's lock."""
    build = slot / f".build-{os.urandom(4).hex()}"
    try:
        for part in ("rootfs", "work", "root"):
            (build / part).mkdir(parents=True)
        if packages.repository is not None:
            _add_repository(base, build, packages.repository)
        names = " ".join(packages.apt)
        with ui.step(f"checking the {packages.name} engine layer against the archive"):
            wanted = _versions(_run_in(base, build, f"apt-get -q update >&2 && apt-get -s install {names}"),
                               r"^Inst (\S+) (?:\[\S+\] )?\((\S+) ")
        if current is not None and manifest(current).get("packages") == wanted:
            shutil.rmtree(build)
            _set_current(slot, current)
            return current
        with ui.step(f"preparing the {packages.name} engine layer: installing {names} (once)"):
            installed = _versions(_run_in(base, build, "\n".join([
                "export DEBIAN_FRONTEND=noninteractive", "set -e", f"{_APT_INSTALL} {names} >&2",
                f"mkdir -p {Path(_APT_STAMP).parent} && touch {_APT_STAMP}",
                "dpkg-query -W -f='${Package} ${Version}\\n'"])), r"^(\S+) (\S+)$")
        moved = sorted(name for name, version in wanted.items() if installed.get(name) != version)
        if moved:
            raise MachineError(f"the archive changed while the {packages.name} engine layer was built "
                               f"({', '.join(moved[:3])}): run the command again")
        _strip(build / "rootfs")
        _hold_back(build / "rootfs")
        if (build / "rootfs/usr").is_dir():  # its /usr hides the base's, and is newer than the base's stamps
            mark_up_to_date(build / "rootfs")
        for part in ("work", "root"):
            shutil.rmtree(build / part)
        (build / "users").mkdir()
        record = {"recipe": RECIPE, "base": str(base), "apt": list(packages.apt), "packages": wanted,
                  "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_atomic(build / "manifest.json", json.dumps(record, indent=1, sort_keys=True).encode(), 0o644)
        generation = slot / f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.urandom(3).hex()}"
        os.rename(build, generation)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    _set_current(slot, generation)
    _prune_slot(slot, everything=False, dry_run=False)  # what it supersedes and no machine uses: no create will
    return generation


def _add_repository(base: Path, build: Path, repository: Repository) -> None:
    """Write the key and list the engine role writes to add `repository` on a host like `base` (its facts, from
    the facts script run in the build's container) into the build's upper layer, for apt and the machines."""
    from machine.roles.facts import FACTS_SCRIPT, parse_facts  # late: only a repository's build needs them

    files = repository.files(parse_facts(_run_in(base, build, FACTS_SCRIPT)))
    for path, data in ((files.key_path, repository.key(files)), (files.list_path, files.list_text.encode())):
        target = build / "rootfs" / path.lstrip("/")
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(target, data, 0o644)


def _versions(output: str, pattern: str) -> dict[str, str]:
    return dict(re.findall(pattern, output, re.M))


def _run_in(base: Path, build: Path, script: str) -> str:
    """Run `script` as root in a throwaway container (no boot, the host's network for the archive) over an
    overlay of `base` and build/rootfs, which keeps what it writes; its stdout. The overlay lives in a mount
    namespace of its own, so it vanishes with the command, whatever happens."""
    # redirect_dir and metacopy off: a renamed directory or a changed owner is copied up whole, so the layer
    # needs nothing from the builder's overlay to mean the same in another stack.
    mount = (f"mount -t overlay overlay -o lowerdir={base},upperdir={build}/rootfs,workdir={build}/work,"
             f"redirect_dir=off,metacopy=off,index=off {build}/root && exec systemd-nspawn --quiet --register=no "
             f"--keep-unit --machine=pm-build-{build.name[-8:]} --directory={build}/root --resolv-conf=replace-host "
             f"--link-journal=no --pipe -- sh -c \"$0\"")
    try:
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, script],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise MachineError(f"building the engine layer took more than {BUILD_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("Attempted to remove")]
        raise MachineError(f"building the engine layer failed (exit {proc.returncode}): "
                           f"{lines[-1] if lines else 'no output'}")
    return proc.stdout


def remove(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.is_symlink() or path.exists():
        path.unlink()


def _hold_back(rootfs: Path) -> None:
    """Add HELD_BACK's placeholder when the layer installed its unit (in /usr/lib: merged /usr, or /lib)."""
    unit, placeholder, text = HELD_BACK
    if any((rootfs / lib / unit).exists() for lib in ("usr/lib", "lib")):
        (rootfs / placeholder).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(rootfs / placeholder, text.encode(), 0o644)


def _strip(rootfs: Path) -> None:
    """Take out of the build's upper layer what is about the build (STRIP), and its overlay bookkeeping."""
    for pattern in STRIP:
        # glob.glob, not Path.glob: a link to what only the machine has (a unit, its resolv.conf) dangles here,
        # and Path.glob skips a dangling link named without a wildcard.
        for path in map(Path, glob.glob(str(rootfs / pattern))):
            remove(path)
    for top in EMPTIED:
        for path in (rootfs / top).rglob("*"):
            if not path.is_dir() or path.is_symlink():
                path.unlink()
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            for attr in _BUILD_XATTRS:
                with contextlib.suppress(OSError):  # absent, mostly
                    os.removexattr(path, attr, follow_symlinks=False)
