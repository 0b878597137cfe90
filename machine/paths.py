"""Where the shipped data (templates, roles) lives: in the source tree, or inside the installed wheel."""

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(kind: str) -> Path:
    """The `templates` or `roles` directory."""
    installed = _PACKAGE / "data" / kind
    return installed if installed.is_dir() else _PACKAGE.parent / kind


def roles_dir() -> Path:
    """The roles provisioning runs: $PYMACHINE_ROLES_PATH (a user's own copy) or the shipped ones."""
    override = os.environ.get("PYMACHINE_ROLES_PATH")
    return Path(override) if override else data_dir("roles")
