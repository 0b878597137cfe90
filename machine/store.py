"""The on-disk store under $PYMACHINE_HOME: shared certs, one directory per machine, a cache of images.

Every write is atomic (temp file, fsync, rename) so a crash never leaves a torn config.json, and a
per-machine lock file serialises the commands that change one machine.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from machine.errors import MachineError, UsageError

HOME_ENV = "PYMACHINE_HOME"
CACHE_ENV = "PYMACHINE_CACHE"


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (a lock file, or a directory), waiting at most `timeout` seconds."""
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise MachineError(f"{what} is busy: another pymachine command holds its lock") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


@dataclass
class Machine:
    """One machine's record (config.json) and the paths of its files."""

    name: str
    driver: str
    id: str
    dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    state: str = "creating"
    created: str = ""
    engine: dict[str, Any] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    @property
    def key_path(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def known_hosts_path(self) -> Path:
        return self.dir / "known_hosts"

    def save(self) -> None:
        record = {k: v for k, v in asdict(self).items() if k != "dir"}
        write_atomic(self.config_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())

    def record(self, **resources: Any) -> None:
        """Persist driver resources as soon as they exist, so a failed create can be undone."""
        self.resources.update(resources)
        self.save()

    def lock(self, timeout: float = 120.0) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.dir / "lock", timeout, f"machine {self.name!r}")


class Store:
    """The pymachine home directory."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home or os.environ.get(HOME_ENV) or Path.home() / ".pymachine")
        self.machines_dir = self.home / "machines"
        self.certs_dir = self.home / "certs"
        self.cache_dir = Path(os.environ.get(CACHE_ENV) or self.home / "cache")

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
        return (self.machines_dir / name).is_dir()

    def load(self, name: str) -> Machine:
        path = self.machines_dir / name / "config.json"
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            if self.exists(name):
                raise MachineError(f"machine {name!r} has no config.json; remove it with `rm -f {name}`") from None
            raise MachineError(f"no machine named {name!r}") from None
        except json.JSONDecodeError as e:
            raise MachineError(f"machine {name!r} has a corrupt config.json: {e}") from None
        return Machine(dir=path.parent, **record)

    def reserve(self, name: str, driver: str, options: dict[str, Any], engine: dict[str, Any] | None = None) -> Machine:
        """Create machines/<name>/ with its config.json in one atomic rename; refuse a taken name."""
        self._ensure(self.machines_dir)
        staging = Path(tempfile.mkdtemp(dir=self.machines_dir, prefix=f".{name}."))
        machine = Machine(
            name=name,
            driver=driver,
            id=secrets.token_hex(4),
            dir=staging,
            options=options,
            engine=engine or {},
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        machine.save()
        target = self.machines_dir / name
        try:
            os.rename(staging, target)
        except OSError as e:
            shutil.rmtree(staging)
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise UsageError(f"machine {name!r} already exists") from None
            raise
        machine.dir = target
        return machine

    def delete(self, machine: Machine) -> None:
        shutil.rmtree(machine.dir, ignore_errors=True)

    def cache(self, *parts: str) -> Path:
        return self._ensure(self.cache_dir.joinpath(*parts))

    def certs(self) -> Path:
        return self._ensure(self.certs_dir)
