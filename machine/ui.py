"""Human output: progress on a terminal, silence when stderr is not one (scripts, CI)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from rich.console import Console

console = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """Show a spinner with `message` while the block runs (only on a terminal)."""
    if not console.is_terminal:
        yield
        return
    with console.status(message):
        yield
    console.print(f"[green]✓[/] {message}")


def note(message: str) -> None:
    if console.is_terminal:
        console.print(message)


def err(message: str) -> None:
    print(f"pymachine: {message}", file=sys.stderr)
