"""Human output: progress on a terminal, plain progress lines outside one (logs, CI), errors in one line.

A command working on several machines at once gives each worker thread a `Line` (`showing()`): the steps,
provisioning tasks and downloads of that thread's machine go to its line instead of a spinner of their own
(rich allows one live display at a time, and two spinners would fight over the terminal).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

_thread = threading.local()  # .line: the Line of the machine this thread works on
_write_lock = threading.Lock()  # whole lines from concurrent workers, never interleaved
_live = threading.Event()  # set while a live display owns the terminal


@functools.cache
def _console() -> Console:
    # Made (and rich imported, ~30 ms) on first use: the quick commands (ip, env, ls) never show progress.
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def __getattr__(name: str) -> Any:
    if name == "console":  # ui.console: the one console of the process
        return _console()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Line(Protocol):
    def update(self, text: str) -> None: ...


def current_line() -> Line | None:
    return getattr(_thread, "line", None)


@contextlib.contextmanager
def showing(line: Line) -> Iterator[None]:
    """Send this thread's progress (ui.step, provisioning tasks, downloads) to `line` while the block runs."""
    previous = current_line()
    _thread.line = line
    try:
        yield
    finally:
        _thread.line = previous


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """Show `message` while the block runs: on this thread's machine line, else a spinner on a terminal."""
    line = current_line()
    if line is not None:
        line.update(message)
        yield
        return
    if not _console().is_terminal:
        yield
        return
    with _console().status(message):
        yield
    _console().print(f"[green]✓[/] {message}")


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns, three spaces apart (as docker-machine's tables are)."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    return "\n".join("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows)


def note(message: str) -> None:
    if _console().is_terminal:
        _console().print(message)


def err(message: str) -> None:
    if _live.is_set():  # printed above the live lines (rich serialises it with their refresh)
        from rich.text import Text

        _console().print(Text(f"pymachine: {message}"), soft_wrap=True)
    else:
        print(f"pymachine: {message}", file=sys.stderr)


def out(text: str) -> None:
    """A command's own output (stdout), written whole even while other workers write theirs."""
    if _live.is_set() and sys.stdout.isatty():  # the terminal the live lines are on
        from rich.text import Text

        _console().print(Text(text.rstrip("\n")), soft_wrap=True)
        return
    with _write_lock:
        sys.stdout.write(text)
        sys.stdout.flush()


# -- one line per machine -----------------------------------------------------------------------------------
class Board(Protocol):
    """The lines of a command over several machines: `line(name)` for its worker, `finish` when it ends."""

    def __enter__(self) -> Board: ...

    def __exit__(self, *exc: object) -> None: ...

    def line(self, name: str) -> Line: ...

    def finish(self, name: str, error: str | None) -> None: ...


class _PlainLine:
    def __init__(self, name: str) -> None:
        self.name = name
        self._last = ""

    def update(self, text: str) -> None:
        if text != self._last:  # a step re-announced (a retried connection) is one line in a log
            self._last = text
            out(f"{self.name}: {text}\n")


class PlainBoard:
    """`web1: creating web1 (local)`, `web1: provisioning: engine : install`, `web1: ready`: the live display's
    information as lines, for logs and CI. On stdout, with the results: stderr carries only errors."""

    def __init__(self, done: str) -> None:
        self._done = done

    def __enter__(self) -> PlainBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def line(self, name: str) -> Line:
        return _PlainLine(name)

    def finish(self, name: str, error: str | None) -> None:
        out(f"{name}: {self._done if error is None else 'failed: ' + error}\n")


class _LiveLine:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def update(self, text: str) -> None:
        from rich.markup import escape

        self._progress.update(self._task, description=escape(text))


class LiveBoard:
    """A live line per machine on the terminal: its name, what it is doing (or how it ended), the time taken."""

    def __init__(self, names: Sequence[str], done: str) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._done = done
        self._progress = Progress(
            SpinnerColumn(finished_text=" "), TextColumn("[bold]{task.fields[machine]}"),
            TextColumn("{task.description}"), TimeElapsedColumn(),
            console=_console(), redirect_stdout=False, redirect_stderr=False,
        )
        self._tasks = {n: self._progress.add_task("waiting", machine=n, total=1, start=False) for n in names}

    def __enter__(self) -> LiveBoard:
        self._progress.start()
        _live.set()
        return self

    def __exit__(self, *exc: object) -> None:
        _live.clear()
        self._progress.stop()

    def line(self, name: str) -> Line:
        self._progress.start_task(self._tasks[name])
        return _LiveLine(self._progress, self._tasks[name])

    def finish(self, name: str, error: str | None) -> None:
        from rich.markup import escape

        text = f"[green]✓ {self._done}[/]" if error is None else f"[red]✗ failed:[/] {escape(error)}"
        self._progress.update(self._tasks[name], description=text, completed=1)


def board(names: Sequence[str], done: str, plain_for_one: bool = False) -> Board | None:
    """The lines for a command over `names` (None: a single machine keeps the spinner of ui.step, and outside a
    terminal its silence, unless `plain_for_one`)."""
    if _console().is_terminal:
        return LiveBoard(names, done) if len(names) > 1 else None
    return PlainBoard(done) if len(names) > 1 or plain_for_one else None
