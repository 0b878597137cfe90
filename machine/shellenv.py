"""`pymachine env`: set or unset variables in the syntax of the user's shell."""

from __future__ import annotations

import os
import re
from pathlib import Path

from machine.errors import UsageError

SHELLS = ("bash", "zsh", "sh", "fish", "powershell", "cmd")

_SET = {
    "fish": 'set -gx {k} "{v}";',
    "powershell": '$Env:{k} = "{v}"',
    "cmd": "SET {k}={v}",
}
# What each shell would expand or split in a value as _SET quotes it, and the escape that keeps it literal: the
# machine's directory is under the user's PYMACHINE_HOME, which may hold any character.
_SPECIAL = {
    "fish": (re.compile(r'([\\$"])'), r"\\\1"),
    "powershell": (re.compile(r'([`$"])'), r"`\1"),
    "cmd": (re.compile(r"([\^&|<>()])"), r"^\1"),
}
_POSIX_SPECIAL = (re.compile(r'([\\$`"])'), r"\\\1")
_UNSET = {
    "fish": "set -e {k};",
    "powershell": "Remove-Item Env:\\\\{k}",
    "cmd": "SET {k}=",
}
_COMMENT = {"powershell": "# ", "cmd": "REM ", "fish": "# "}
# Python's requests lets these replace the CA a client gives its session: docker-compose 1.x (docker-py) then checks
# the engine's certificate against the system's CAs and fails, where the docker CLI works.
CA_BUNDLE_VARS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
_HOW = {
    "fish": "eval (pymachine env{args})",
    "powershell": "& pymachine env{args} | Invoke-Expression",
    "cmd": "@FOR /f \"tokens=*\" %i IN ('pymachine env{args}') DO @%i",
}


def detect() -> str:
    """The user's shell from $SHELL, bash-compatible syntax when unknown."""
    name = Path(os.environ.get("SHELL", "bash")).name
    return name if name in SHELLS else "bash"


def ca_bundle_overrides() -> list[str]:
    """The variables of CA_BUNDLE_VARS set in this environment (they are the user's: `env` leaves them alone)."""
    return [name for name in CA_BUNDLE_VARS if os.environ.get(name)]


def render(values: dict[str, str | None], shell: str, args: str) -> str:
    """Lines that set (or, for None values, unset) each variable, then how to apply them."""
    if shell not in SHELLS:
        raise UsageError(f"--shell: {shell!r} is not one of {', '.join(SHELLS)}")
    lines = []
    for key, value in values.items():
        if value is None:
            lines.append(_UNSET.get(shell, "unset {k}").format(k=key))
        else:
            special, escape = _SPECIAL.get(shell, _POSIX_SPECIAL)
            lines.append(_SET.get(shell, 'export {k}="{v}"').format(k=key, v=special.sub(escape, value)))
    comment = _COMMENT.get(shell, "# ")
    lines.append(f"{comment}Run this command to configure your shell:")
    lines.append(comment + _HOW.get(shell, "eval $(pymachine env{args})").format(args=args))
    return "\n".join(lines)
