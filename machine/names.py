"""Names checked before use: machine names, which double as hostnames, directory names and parts of interface
names; and the user names pymachine logs in as, which go into SSH's command line and cloud-init's user-data."""

import re

from machine.errors import UsageError

LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# A portable user name (useradd's rule, $ for a Samba machine account): never a leading "-", which ssh would read as
# an option, nor a space or shell character.
USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")


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


def validate_user(flag: str, user: str) -> str:
    """Return `user` if it is a user name pymachine may log in as, else raise UsageError naming `flag`."""
    if not USER.fullmatch(user):
        raise UsageError(f"{flag}: {user!r} is not a user name")
    return user
