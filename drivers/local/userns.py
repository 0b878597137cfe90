"""User namespaces for local machines: a host-wide lease of UID ranges, the idmapped base, the shifted upper.

A user-namespaced machine (`--local-isolation userns`, the default) runs as host UIDs SHIFT..SHIFT+65535: its
root is SHIFT, never the host's root. The range is leased host-wide (one JSON file under /var/lib/pymachine,
guarded by a lock, like the address leases), because every pymachine home on the host draws from the same UIDs.
It is fixed for the machine's life, since the machine's files are stored with it: the upper layer and the engine
volumes hold SHIFT+uid on disk, and the shared base (owned by real root, never chowned) is seen through an
idmapped bind mount made in the supervisor's private mount namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from machine.drivers.local import leases as host_leases
from machine.errors import MachineError

RANGE = 0x10000  # 65536 UIDs (and as many GIDs) per machine
# The span systemd-nspawn --private-users=pick draws from, far above login users and /etc/subuid's usual ranges.
FIRST, LAST = 0x00080000, 0x6FFF0000
STATE_DIR = Path(os.environ.get("PYMACHINE_UID_STATE", "/var/lib/pymachine/uid-ranges"))
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
NSPAWN_LOCKS = Path("/run/systemd/nspawn-uid")  # ranges nspawn --private-users=pick holds


# -- the lease --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _leases() -> Iterator[dict[str, str]]:
    """The host's UID-range leases ({first uid: owner}) under the lock; saved when the block ends."""
    with host_leases.table(STATE_DIR / "leases.json", "the UID-range leases", {"size": RANGE}) as (_, held):
        yield held


def _reserved() -> list[tuple[int, int]]:
    """[first, end) spans that other tools hand out on this host: /etc/subuid, /etc/subgid."""
    spans = []
    for path in SUBID_FILES:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                    spans.append((int(fields[1]), int(fields[1]) + int(fields[2])))
    return spans


def lease(owner: str, wanted: int | None = None) -> int:
    """Give `owner` (a machine directory) a range of RANGE UIDs and return its first; keep `wanted` when it is
    still the owner's (a machine's files are stored in its range: it can never move)."""
    with _leases() as leases:
        # Never forgotten because the owner's directory is not there (a home on a filesystem not mounted now):
        # its files are stored in the range, and another machine in it would share their owners. rm releases.
        if wanted is not None:
            if leases.get(str(wanted), owner) != owner:
                raise MachineError(f"UID range {wanted}-{wanted + RANGE - 1} is leased to {leases[str(wanted)]}")
            leases[str(wanted)] = owner
            return wanted
        held = next((int(first) for first, who in leases.items() if who == owner), None)
        if held is not None:
            return held
        reserved = _reserved()
        for first in range(FIRST, LAST - RANGE + 1, RANGE):
            end = first + RANGE
            if (str(first) in leases or any(lo < end and first < hi for lo, hi in reserved)
                    or (NSPAWN_LOCKS / str(first)).exists()):
                continue
            leases[str(first)] = owner
            return first
        raise MachineError(f"no free range of {RANGE} UIDs left between {FIRST:#x} and {LAST:#x}")


def leased_to(owner: str) -> int | None:
    """The first UID of the range `owner` holds, if any (a report, not a decision)."""
    first = host_leases.held_by(STATE_DIR / "leases.json", owner)
    return int(first) if first is not None else None


def release(owner: str) -> None:
    with _leases() as leases:
        for first in [f for f, who in leases.items() if who == owner]:
            del leases[first]


# -- files stored in the machine's range ------------------------------------------------------------------
def shift_tree(top: Path, shift: int) -> None:
    """Own every entry under `top` (itself included) by shift+uid, shift+gid, keeping modes (chown clears
    setuid and setgid bits). Entries already in the range are left alone, so a second pass changes nothing."""
    def one(path: str) -> None:
        st = os.lstat(path)
        uid = st.st_uid + shift if st.st_uid < RANGE else st.st_uid
        gid = st.st_gid + shift if st.st_gid < RANGE else st.st_gid
        if (uid, gid) == (st.st_uid, st.st_gid):
            return
        os.lchown(path, uid, gid)
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o6000:
            os.chmod(path, stat.S_IMODE(st.st_mode))

    for dirpath, dirnames, filenames in os.walk(top):
        one(dirpath)
        for name in filenames:
            one(os.path.join(dirpath, name))
        for name in dirnames:  # a symlink to a directory is listed here and not walked into
            if os.path.islink(os.path.join(dirpath, name)):
                one(os.path.join(dirpath, name))


# -- the idmapped base ------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # the same on every architecture
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC, _AT_EMPTY_PATH, _AT_FDCWD = 1, 0o2000000, 0x1000, -100
_MOVE_MOUNT_F_EMPTY_PATH, _MOUNT_ATTR_IDMAP = 0x4, 0x100000
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000


def _syscall(number: int, *args: int | bytes | ctypes.Array) -> int:
    wide = [a if isinstance(a, bytes | ctypes.Array) else ctypes.c_long(a) for a in args]
    result = _libc.syscall(ctypes.c_long(number), *wide)
    if result < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result


# One fork at a time: a child forked by one thread holds copies of the pipes another thread made for its own
# child, which then waits for an EOF that cannot come while the first child lives (and vice versa).
_FORK_LOCK = threading.Lock()


def _userns_fd(shift: int) -> int:
    """An fd of a new user namespace mapping 0..RANGE-1 to shift..: what an idmapped mount is made with."""
    with _FORK_LOCK:
        return _forked_userns_fd(shift)


def _forked_userns_fd(shift: int) -> int:
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # only async-signal-safe work here: unshare, then wait to be mapped and let go
        code = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            code = 0 if _libc.unshare(_CLONE_NEWUSER) == 0 else 1
            os.write(ready_w, b"1" if code == 0 else b"0")
            os.read(done_r, 1)
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise MachineError("cannot create a user namespace (is user.max_user_namespaces 0?)")
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{pid}/{name}").write_text(f"0 {shift} {RANGE}\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)
        os.waitpid(pid, 0)


def idmapped_tree(source: str, shift: int) -> int:
    """A detached bind mount of `source` in which uid and gid k on disk appear as shift+k; an fd for
    `attach()`. Raises a one-line MachineError when `source`'s filesystem cannot be idmapped (NFS, an overlayfs)."""
    userns = _userns_fd(shift)
    try:
        tree = _syscall(_SYS_OPEN_TREE, _AT_FDCWD, os.fsencode(source), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC)
        attr = struct.pack("QQQQ", _MOUNT_ATTR_IDMAP, 0, 0, userns)
        try:
            _syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.create_string_buffer(attr, len(attr)),
                     len(attr))
        except OSError as e:
            os.close(tree)
            raise MachineError(
                f"cannot idmap the base image at {source} ({_fstype(source)}: {e.strerror}), which "
                f"--local-isolation userns needs: keep the image cache (PYMACHINE_CACHE) on a local filesystem "
                f"such as ext4, xfs, btrfs or tmpfs, or create the machine with --local-isolation privileged"
            ) from None
        return tree
    finally:
        os.close(userns)


def private_mount_namespace() -> None:
    """Move the calling process into a mount namespace of its own, propagating nothing back to the host.
    (Run in the supervisor's child before it execs: `unshare --mount --propagation private` without a process.)"""
    if _libc.unshare(_CLONE_NEWNS) != 0 or _libc.mount(None, b"/", None, ctypes.c_ulong(_MS_REC | _MS_PRIVATE),
                                                        None) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def attach(tree: int, target: str) -> None:
    """Mount the detached tree from `idmapped_tree()` on `target` (in the calling process's mount namespace)."""
    _syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH)


def _fstype(path: str) -> str:
    """The type of the filesystem holding `path`, from the longest mount point above it."""
    best, fstype = "", "unknown filesystem"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, right = line.split(" - ", 1)
            point = left.split()[4]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, fstype = point, right.split()[0]
    return fstype
