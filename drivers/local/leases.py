"""Host-wide lease tables (addresses on a bridge, UID ranges): one JSON file each, shared by every pymachine
home on the host, changed only under a lock on the directory that holds them (a lock file per table would
outlive the table)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from machine.store import file_lock, write_atomic


@contextlib.contextmanager
def table(state_file: Path, what: str, meta: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    """(the file's state as it was, its leases {key: owner}) under the lock. When the block ends the leases are
    saved with `meta` (the file is removed once none is left); when it raises, nothing is written."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(state_file.parent, timeout=60, what=what):
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        leases: dict[str, str] = dict(state.get("leases", {}))
        yield state, leases
        if leases:
            write_atomic(state_file, json.dumps({**meta, "leases": leases}, indent=2).encode(), 0o644)
        else:
            state_file.unlink(missing_ok=True)


def held_by(state_file: Path, owner: str) -> str | None:
    """The key `owner` holds, if any (read without the lock: a report, not a decision)."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None
    return next((key for key, who in state.get("leases", {}).items() if who == owner), None)
