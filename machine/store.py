"""The on-disk store under $PYMACHINE_HOME: shared certs, one directory per machine, a cache of images.

A machine has two records. `journal` is append-only: its first line is the machine's identity, and every resource
is appended (and fsynced) before or at the moment it is made; a crash can tear only its last line. `config.json` is
the current state, replaced atomically. When config.json is damaged or missing, the journal still says what exists,
so `rm -f` can find and remove it. A per-machine lock serialises the commands that change one machine: a command
takes the lock, then loads the record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from machine.errors import MachineError, UsageError

HOME_ENV = "PYMACHINE_HOME"
CACHE_ENV = "PYMACHINE_CACHE"
LOCK_TIMEOUT = 120.0


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix."""
    tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}"  # as tempfile would, without importing it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):
            e.filename = str(path)  # the file the user knows of (a full disk's error names none)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name `path` in an OSError of the block that names no file: a full disk's (ENOSPC from a write, a flush or
    an fsync) names none, and the user would read "No space left on device" without knowing where."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def read_own(path: Path) -> bytes | None:
    """`path`'s content if this user owns it and nobody else may write it, else None (also when it cannot be read):
    for cache files whose content runs as our code (compiled templates, loaded plays)."""
    try:
        with path.open("rb") as f:
            st = os.fstat(f.fileno())
            return None if st.st_uid != os.geteuid() or st.st_mode & 0o022 else f.read()
    except OSError:
        return None


def write_cache(path: Path, data: bytes) -> None:
    """Replace the cache file `path` (readable by its owner only); a failure only costs the next run the work
    the file would have spared it."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)


def disk_usage(path: Path) -> int:
    """Bytes the files under `path` (a file or a tree) take on disk, each hard-linked file once, as `du`."""
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        paths += (Path(root, name) for root, dirs, files in os.walk(path) for name in [*dirs, *files])
    inodes = {}
    for each in paths:
        st = each.lstat()
        inodes[st.st_dev, st.st_ino] = st.st_blocks * 512
    return sum(inodes.values())


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _flock(fd: int, timeout: float, what: str, shared: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise MachineError(f"{what} is busy: another pymachine command holds its lock") from None
            time.sleep(0.05)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, what: str, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive flock on `path` (a lock file, or a directory), or with `shared` one that excludes only
    the exclusive holders, waiting at most `timeout` seconds."""
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _flock(fd, timeout, what, shared)
        yield
    finally:
        os.close(fd)


class RecordDamaged(MachineError):
    """config.json is missing or unreadable; the journal may still tell what the machine made."""


# config.json's fields and their types; name, driver and id are what every command needs.
_FIELDS: dict[str, type] = {
    "name": str, "driver": str, "id": str, "options": dict, "resources": dict, "state": str, "created": str,
    "engine": dict, "fleet": dict,
}
_REQUIRED = ("name", "driver", "id")


class Machine:
    """One machine's record (config.json) and the paths of its files. A plain class: every quick command loads
    one, and the dataclasses module would cost them more than the rest of the store."""

    def __init__(self, name: str, driver: str, id: str, dir: Path, options: dict[str, Any] | None = None,
                 resources: dict[str, Any] | None = None, state: str = "creating", created: str = "",
                 engine: dict[str, Any] | None = None, fleet: dict[str, Any] | None = None) -> None:
        self.name, self.driver, self.id, self.dir = name, driver, id, dir
        self.options = {} if options is None else options
        self.resources = {} if resources is None else resources
        self.state, self.created = state, created
        self.engine = {} if engine is None else engine
        # Set by `apply` on the machines it makes from a fleet file ({"name": …, "roles": …}); `apply --prune`
        # removes only machines that carry its fleet's name.
        self.fleet = {} if fleet is None else fleet
        # config.json as this process last read or wrote it: a save that would write the same bytes to the same
        # file is skipped (a fleet's no-op run would otherwise fsync a file per machine for nothing).
        self._written: tuple[Path, bytes] | None = None

    def __repr__(self) -> str:
        return f"Machine({self.name!r}, driver={self.driver!r}, state={self.state!r})"

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    @property
    def journal_path(self) -> Path:
        return self.dir / "journal"

    @property
    def key_path(self) -> Path:
        # pymachine's own key, or the copy of a key the user brought (a driver records its file name).
        return self.dir / self.resources.get("ssh_key_file", "id_ed25519")

    @property
    def known_hosts_path(self) -> Path:
        return self.dir / "known_hosts"

    def save(self) -> None:
        record = {k: getattr(self, k) for k in _FIELDS}
        data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        if self._written != (self.config_path, data):
            write_atomic(self.config_path, data)
            self._written = (self.config_path, data)

    def record(self, **resources: Any) -> None:
        """Journal resources before (or as) they are made, so a failed or killed create can always be undone."""
        _append(self.journal_path, {"resources": resources})
        self.resources.update(resources)
        self.save()


def _append(journal: Path, entry: dict[str, Any]) -> None:
    fd = os.open(journal, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    with writing(journal), os.fdopen(fd, "r+b") as f:
        size = os.fstat(fd).st_size
        # After a torn last line (a crash while writing it), the entry starts a line of its own: appended to the
        # torn one, it would be skipped with it.
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        f.write(b"\n" * torn + json.dumps(entry, sort_keys=True).encode() + b"\n")
        f.flush()
        os.fsync(fd)


def _replay(journal: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(identity, resources) from a journal; a torn or damaged line is skipped."""
    identity: dict[str, Any] = {}
    resources: dict[str, Any] = {}
    try:
        lines = journal.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return identity, resources
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("identity"), dict) and not identity:
            identity = entry["identity"]
        elif isinstance(entry, dict) and isinstance(entry.get("resources"), dict):
            resources.update(entry["resources"])
    return identity, resources


def _validate(name: str, record: Any) -> dict[str, Any]:
    """The fields of a parsed config.json, or RecordDamaged saying what is wrong with it."""
    if not isinstance(record, dict):
        raise RecordDamaged(f"machine {name!r} has a damaged config.json (not an object)")
    for key in _REQUIRED:
        if key not in record:
            raise RecordDamaged(f"machine {name!r} has a damaged config.json (no {key!r})")
    for key, kind in _FIELDS.items():
        if key in record and not isinstance(record[key], kind):
            raise RecordDamaged(f"machine {name!r} has a damaged config.json ({key!r} is not a {kind.__name__})")
    return {k: v for k, v in record.items() if k in _FIELDS}


class Store:
    """The pymachine home directory."""

    def __init__(self, home: Path | None = None) -> None:
        # Absolute: paths of the store are recorded where other processes, in other directories, read them (the
        # owners of address leases and cache marks, DOCKER_CERT_PATH).
        self.home = Path(home or os.environ.get(HOME_ENV) or Path.home() / ".pymachine").absolute()
        self.machines_dir = self.home / "machines"
        self.certs_dir = self.home / "certs"
        self.cache_dir = Path(os.environ.get(CACHE_ENV) or self.home / "cache").absolute()

    def _ensure(self, path: Path) -> Path:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def names(self) -> list[str]:
        if not self.machines_dir.is_dir():
            return []
        return sorted(
            p.name for p in self.machines_dir.iterdir() if not p.name.startswith(".") and p.is_dir()
        )

    def exists(self, name: str) -> bool:
        try:
            return self._dir(name).is_dir()
        except MachineError:
            return False

    def _dir(self, name: str) -> Path:
        """machines/<name>; a name that would point elsewhere (`..`, a slash, a hidden entry) names no machine."""
        if not name or "/" in name or name.startswith(".") or "\0" in name:
            raise MachineError(f"no machine named {name!r}")
        return self.machines_dir / name

    def load(self, name: str) -> Machine:
        """The machine's record; RecordDamaged when config.json is missing or unreadable."""
        directory = self._dir(name)
        try:
            text = (directory / "config.json").read_text()
        except FileNotFoundError:
            if directory.is_dir():
                raise RecordDamaged(f"machine {name!r} has no config.json") from None
            raise MachineError(f"no machine named {name!r}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RecordDamaged(f"machine {name!r}: cannot read config.json: {e}") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordDamaged(f"machine {name!r} has a corrupt config.json ({e})") from None
        fields = _validate(name, record)
        fields["name"] = name  # the directory names the machine, whatever a hand-edited record says
        machine = Machine(dir=directory, **fields)
        machine._written = (machine.config_path, text.encode())
        return machine

    def recover(self, name: str) -> Machine:
        """The machine as its journal tells it, for removing one whose config.json is damaged."""
        directory = self._dir(name)
        identity, resources = _replay(directory / "journal")
        if not all(isinstance(identity.get(k), str) for k in ("driver", "id")):
            raise MachineError(f"machine {name!r} has neither a readable config.json nor a journal: pymachine cannot "
                               f"tell what it made; inspect {directory} and remove it by hand")
        options = identity.get("options") if isinstance(identity.get("options"), dict) else {}
        return Machine(name=name, driver=identity["driver"], id=identity["id"], dir=directory, options=options,
                       resources=resources, state="error", created=str(identity.get("created", "")))

    def busy(self, name: str) -> bool:
        """Whether a command holds the machine's lock now (a create still making it, say): a look, never a wait.
        The kernel drops a lock with the last descriptor of its holder, so a killed command holds none."""
        try:
            fd = os.open(self._dir(name) / "lock", os.O_RDONLY | os.O_NOFOLLOW)
        except (OSError, MachineError):
            return False
        try:
            # Shared, and let go at once: a command that takes the lock meanwhile only retries, as it does anyway.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @contextlib.contextmanager
    def locked(self, name: str, recover: bool = False, timeout: float = LOCK_TIMEOUT) -> Iterator[Machine]:
        """Take the machine's lock, then load its record (from the journal, with `recover`, if it is damaged)."""
        directory = self._dir(name)
        try:
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except (FileNotFoundError, NotADirectoryError):
            raise MachineError(f"no machine named {name!r}") from None
        try:
            _flock(fd, timeout, f"machine {name!r}")
            if os.fstat(fd).st_nlink == 0:  # removed (the directory renamed away) while we waited
                raise MachineError(f"machine {name!r} was removed while this command waited for it")
            try:
                machine = self.load(name)
            except RecordDamaged:
                if not recover:
                    raise
                machine = self.recover(name)
            yield machine
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def reserve(self, name: str, driver: str, options: dict[str, Any],
                engine: dict[str, Any] | None = None) -> Iterator[Machine]:
        """Create machines/<name>/ (identity journaled, config.json, lock held) in one rename; refuse a taken name."""
        self._ensure(self.machines_dir)
        staging = self.machines_dir / f".{name}.{os.urandom(6).hex()}"
        staging.mkdir(mode=0o700)
        created = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())  # ISO 8601, UTC, as datetime gives it
        machine = Machine(name=name, driver=driver, id=os.urandom(4).hex(), dir=staging, options=options,
                          engine=engine or {}, created=created)
        fd = None
        try:
            _append(machine.journal_path, {"identity": {"name": name, "driver": driver, "id": machine.id,
                                                        "options": options, "created": machine.created}})
            machine.save()
            fd = os.open(staging / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # nobody else can know the staging directory yet
            os.rename(staging, self.machines_dir / name)
        except BaseException as e:
            # Nothing is made yet: a staging directory left (a full disk, the name taken) would be nobody's.
            import shutil  # here, as in delete(): the commands that only look never remove

            if fd is not None:
                os.close(fd)
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise UsageError(f"machine {name!r} already exists") from None
            raise
        machine.dir = self.machines_dir / name
        try:
            yield machine
        finally:
            os.close(fd)

    def delete(self, machine: Machine) -> None:
        """Remove the machine's directory: renamed away first, so no command can open its lock file meanwhile."""
        import shutil

        trash = self.machines_dir / f".removed.{machine.name}.{os.urandom(4).hex()}"
        os.rename(machine.dir, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def cache(self, *parts: str) -> Path:
        return self._ensure(self.cache_dir.joinpath(*parts))

    def certs(self) -> Path:
        return self._ensure(self.certs_dir)
