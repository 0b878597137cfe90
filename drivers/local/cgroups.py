"""A cgroup subtree of its own for every local machine, in every mounted hierarchy.

systemd-nspawn started with --keep-unit stays in its caller's cgroup and creates `payload/` and
`supervisor/` there; two machines in one cgroup would share those. Giving each machine `pymachine/<id>`
below the caller's cgroup in each hierarchy keeps machines apart, lets an engine inside create cgroups
(the machine remounts its controllers read-write, see templates/local/cgroup-delegate.service), and tells
us exactly which processes belong to a machine, so kill and rm can leave none behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from machine.errors import MachineError


def _hierarchies() -> list[tuple[Path, str]]:
    """(mount point, this process's cgroup path relative to it) for every cgroup hierarchy mounted."""
    own: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else ["<unified>"]:
            own[c] = path
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fields, (fstype, _source, options) = left.split(), right.split()[:3]
        mount_root, mount_point = fields[3], Path(fields[4])
        if fstype == "cgroup2":
            key = "<unified>"
        elif fstype == "cgroup":
            opts = options.split(",")
            key = next((o for o in opts if o in own), "")
        else:
            continue
        if key in own:
            rel = os.path.relpath(own[key], mount_root) if own[key].startswith(mount_root) else "."
            found.append((mount_point, rel))
    return found


def paths(machine_id: str) -> list[str]:
    """The machine's cgroup directories below this process's own cgroups, in every hierarchy."""
    found = []
    for mount_point, own in _hierarchies():
        parts = [p for p in (*Path(own).parts, "pymachine", machine_id) if p not in (".", "/")]
        found.append(str(mount_point.joinpath(*parts)))
    return found


# How often a create makes its cgroups again when `pymachine/` goes from under it: each time, another machine's
# rm (or stop) took it away as the last one out.
_MAKE_ATTEMPTS = 100


def create(paths: list[str]) -> None:
    """Make the machine's cgroups (join one by writing a PID to its cgroup.procs)."""
    for top in paths:
        for attempt in range(_MAKE_ATTEMPTS):
            try:
                for path in reversed([Path(top), *Path(top).parents]):
                    if not path.exists():
                        with contextlib.suppress(FileExistsError):  # made meanwhile by another machine's create
                            path.mkdir()
                        _inherit_cpuset(path)
                break
            except FileNotFoundError:
                if attempt == _MAKE_ATTEMPTS - 1:
                    raise


def join(paths: list[str]) -> None:
    """Move the calling process into the machine's cgroups (run in a child before it execs)."""
    for top in paths:
        Path(top, "cgroup.procs").write_text(f"{os.getpid()}\n")


def delegate(paths: list[str], uid: int) -> None:
    """Hand the machine's cgroups to its root (host UID `uid`, in a user namespace): it may then create cgroups
    below them and move its processes. The limit files stay the host root's."""
    for top in paths:
        os.chown(top, uid, uid)
        for name in ("cgroup.procs", "tasks", "cgroup.clone_children", "cgroup.subtree_control", "cgroup.threads"):
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(top, name), uid, uid)


def _inherit_cpuset(path: Path) -> None:
    # A new cgroup v1 cpuset starts with no CPUs and no memory nodes; a process cannot join it until set.
    for name in ("cpuset.cpus", "cpuset.mems"):
        child = path / name
        if child.exists() and not child.read_text().strip():
            child.write_text((path.parent / name).read_text())


def processes(paths: list[str]) -> set[int]:
    """Every process in the machine's cgroups, nested ones included."""
    pids: set[int] = set()
    for top in paths:
        for dirpath, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def kill_all(paths: list[str], timeout: float = 10.0) -> None:
    """SIGKILL every process of the machine until none is left."""
    deadline = time.monotonic() + timeout
    while pids := processes(paths):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise MachineError(f"processes {', '.join(map(str, sorted(pids)))} survived SIGKILL for {timeout:.0f}s "
                               f"(stuck in the kernel, e.g. on a hung mount)")
        time.sleep(0.05)


def remove(paths: list[str]) -> None:
    """Remove the machine's (empty) cgroups, deepest first, and `pymachine/` when it is the last."""
    failed = []
    for top in paths:
        if not os.path.isdir(top):
            continue
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass
            except OSError as e:
                failed.append(f"{dirpath} ({e.strerror})")
        with contextlib.suppress(OSError):  # another machine's cgroups still in it
            os.rmdir(os.path.dirname(top))
    if failed:
        raise MachineError(f"cannot remove cgroup {', '.join(failed)}")


def existing(paths: list[str]) -> list[str]:
    return [p for p in paths if os.path.isdir(p)]
