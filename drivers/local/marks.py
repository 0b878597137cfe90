"""Which machines use a shared directory of the image cache (a base image, an engine layer generation).

Each user is a file in the directory's `users/`, named by a hash of the machine's directory and holding its path:
the directory is in use while one of them names a machine directory that exists, whichever store the machine is in
(stores may share a cache). A create marks before its machine exists, and rm takes the mark out; a mark left by a
create that died names a directory that is gone, and counts for nothing.

Marking and a prune's look at the marks hold the same short lock, and a prune takes away the directory's `ready`
file (the last one a build writes) before anything else: a create either marks first, and the prune keeps the
directory, or finds `ready` gone, and asks for the directory again.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from machine.store import file_lock, write_atomic


def lock(path: Path, what: str) -> contextlib.AbstractContextManager[None]:
    """The marks' lock (`path`: its file, beside what it guards). Short-lived, apart from the build lock: marking
    never waits for a build."""
    return file_lock(path, timeout=600, what=what)


def add(directory: Path, ready: str, machine_dir: Path, held: contextlib.AbstractContextManager[None]) -> bool:
    """Mark `directory` as used by the machine in `machine_dir`, under `held` (lock()); False when a prune
    removed it (its `ready` file is gone) since the caller found it."""
    with held:
        if not (directory / ready).is_file():
            return False
        (directory / "users").mkdir(exist_ok=True)
        write_atomic(_mark(directory, machine_dir), f"{machine_dir}\n".encode(), 0o644)
    return True


def remove(directory: Path, machine_dir: Path) -> None:
    """The machine is gone: the directory stays (other machines, the next create), only its mark goes."""
    _mark(directory, machine_dir).unlink(missing_ok=True)


def in_use(directory: Path) -> bool:
    """Whether a mark names an existing machine directory (the caller holds lock())."""
    users = directory / "users"
    return users.is_dir() and any(Path(u.read_text().strip()).is_dir() for u in users.iterdir())


def _mark(directory: Path, machine_dir: Path) -> Path:
    return directory / "users" / hashlib.sha256(str(machine_dir).encode()).hexdigest()[:16]
