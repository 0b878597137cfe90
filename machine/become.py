"""Becoming root on a host reached as another user: through passwordless sudo, asking it for nothing but `sh`.

A host's sudoers may allow the login only the shell (`deploy ALL=(root) NOPASSWD: /bin/sh`): `sudo env …` or
`sudo systemctl …` would be refused there, while `sudo sh -c …` runs anything. So every command pymachine runs as
root (the role engine's kept root shell, a generic host's reboot) goes through `sudo -n … sh`, and a refusal is
told in one line naming the rule that is missing.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from machine.errors import MachineError


def as_user(user: str, argv: Sequence[str]) -> list[str]:
    """`argv` run as `user` by a shell that sudo started (the shell execs it: no second process)."""
    return ["sudo", "-n", "-H", "-u", user, "--", "sh", "-c", 'exec "$@"', "sh", *argv]


def check_root(conn: Any, why: str) -> None:
    """That `conn` (a machine.ssh.Connection) may become root as as_user asks; else a MachineError naming the
    sudoers rule it needs, `why` saying what needed it."""
    endpoint = conn.endpoint
    result = conn.run(shlex.join(as_user("root", ["true"])), timeout=30)
    if result.rc != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise MachineError(f"{endpoint.user} on {endpoint.host} cannot become root with passwordless sudo "
                           f"({detail[-1] if detail else f'exit {result.rc}'}): {why}; pymachine runs `sudo -n sh` "
                           f"as root: allow it in sudoers (`{endpoint.user} ALL=(root) NOPASSWD: /bin/sh`, or "
                           f"NOPASSWD: ALL), or log in as root")
