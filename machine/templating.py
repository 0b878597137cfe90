"""Jinja2 environments over the shipped template directories (templates/…), made when a command renders
something: importing jinja2 costs ~30 ms, more than a quick command (ip, env, ls) may take in all."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jinja2 import Environment


def environment(directory: Path, *, strict: bool = True, xml: bool = False, **options: Any) -> Environment:
    """Templates from `directory`, trailing newlines kept; `strict`: an undefined variable is an error; `xml`:
    `*.xml.j2` templates escape their values."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, Undefined, select_autoescape

    return Environment(loader=FileSystemLoader(directory), undefined=StrictUndefined if strict else Undefined,
                       keep_trailing_newline=True,
                       autoescape=select_autoescape(enabled_extensions=("xml.j2",) if xml else (),
                                                    default_for_string=False),
                       **options)
