"""Where the shipped data (templates, roles) lives: in the source tree, or inside the installed wheel."""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(kind: str) -> Path:
    """The `templates` or `roles` directory."""
    installed = _PACKAGE / "data" / kind
    return installed if installed.is_dir() else _PACKAGE.parent / kind
