"""Machine names double as hostnames, directory names and parts of interface names."""

import re

from machine.errors import UsageError

LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def validate_name(name: str) -> str:
    """Return `name` if it is a valid machine name (a hostname label), else raise UsageError."""
    if not name:
        raise UsageError("a machine name must not be empty")
    if len(name) > 63:
        raise UsageError(f"invalid machine name {name[:20]!r}…: longer than 63 characters")
    if not LABEL.fullmatch(name):
        raise UsageError(
            f"invalid machine name {name!r}: use letters, digits and inner hyphens (a hostname label)"
        )
    return name
