"""Human output: progress on a terminal, plain progress lines outside one (logs, CI), errors in one line.

A command working on several machines at once gives each worker thread a `Line` (`showing()`): the steps,
provisioning tasks and downloads of that thread's machine go to its line instead of a spinner of their own
(rich allows one live display at a time, and two spinners would fight over the terminal).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

_thread = threading.local()  # .line: the Line of the machine this thread works on
_write_lock = threading.Lock()  # whole lines from concurrent workers, never interleaved
_live = threading.Event()  # set while a live display owns the terminal
# A long step's progress in a log: often enough to show it is alive, seldom enough to stay readable (a
# three-minute debootstrap is a few dozen lines, not the thousands of packages and chunks behind them).
PROGRESS_INTERVAL = 5.0
# The variables with which rich takes a stream that is not a terminal for one.
_FORCING = {"FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"}


@functools.cache
def _console() -> Console:
    # Made (and rich imported, ~30 ms) on first use: the quick commands (ip, env, ls) never show progress.
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def is_terminal() -> bool:
    """Whether progress goes to a terminal, as rich decides it; answered without importing rich (~15 ms of a
    command's start) where stderr is plainly not one and no variable makes rich treat it as one."""
    if not sys.stderr.isatty() and not os.environ.keys() & _FORCING:
        return False
    return _console().is_terminal


def __getattr__(name: str) -> Any:
    if name == "console":  # ui.console: the one console of the process
        return _console()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Line(Protocol):
    def update(self, text: str) -> None:
        """What the machine is doing now (a step, a task): always shown."""

    def progress(self, text: str) -> None:
        """How far the current step has got: live on a terminal, in a log only every PROGRESS_INTERVAL seconds."""


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
    if not is_terminal():
        yield
        return
    with _console().status(message):
        yield
    _console().print(f"[green]✓[/] {message}")


class LongStep:
    """How a long step reports (`long_step`): `report(detail)` as it goes, `done(text)` for its last line."""

    def __init__(self, message: str, show: Callable[[str], None]) -> None:
        self._message, self._show = message, show
        self.started = time.monotonic()
        self.ended: str | None = None

    def report(self, detail: str) -> None:
        self._show(f"{self._message}: {detail}")

    def done(self, text: str) -> None:
        """The line that ends the step (instead of `MESSAGE: done in 2m13s`)."""
        self.ended = text

    def elapsed(self) -> float:
        return time.monotonic() - self.started


@contextlib.contextmanager
def long_step(message: str) -> Iterator[LongStep]:
    """A step that takes a while (a base-image build, a download) and says how far it has got: `message` when it
    starts, the details reported (`MESSAGE: DETAIL`) and how it ended, on this thread's machine line (in a log,
    as plain lines, PROGRESS_INTERVAL seconds apart) or in a spinner on a terminal. Quiet otherwise, as ui.step."""
    line = current_line()
    if line is not None:
        line.update(message)
        step = LongStep(message, line.progress)
        yield step
        line.update(step.ended or f"{message}: done in {duration(step.elapsed())}")
        return
    if not is_terminal():
        yield LongStep(message, lambda text: None)
        return
    from rich.markup import escape

    with _console().status(escape(message)) as status:
        step = LongStep(message, lambda text: status.update(escape(text)))
        yield step
    _console().print(f"[green]✓[/] {escape(step.ended or message)}")


def size(n: float) -> str:
    """`281.9 MiB`: a size (or a rate's bytes) as a person reads it."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def duration(seconds: float) -> str:
    """`4.2 s`, `2m13s`: how long a step took, as a person reads it in a log."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned columns, three spaces apart (as docker-machine's tables are)."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    return "\n".join("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows)


def note(message: str) -> None:
    if is_terminal():
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
        self._written = 0.0  # time.monotonic() of the last line written
        self._pending: str | None = None  # progress held back by the interval
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()  # the worker's progress against the timer's flush

    def update(self, text: str) -> None:
        with self._lock:
            self._pending = None  # a new step: the last one's progress is no news any more
            if text != self._last:  # a step re-announced (a retried connection) is one line in a log
                self._write(text)

    def progress(self, text: str) -> None:
        with self._lock:
            wait = self._written + PROGRESS_INTERVAL - time.monotonic()
            if wait <= 0:
                self._pending = None
                if text != self._last:
                    self._write(text)
                return
            self._pending = text
            if self._timer is None:
                # Written when the interval is up even if nothing follows it for minutes (debootstrap's
                # `Unpacking the base system...`): a log never shows a stale stage for what is being done.
                self._timer = threading.Timer(wait, self._flush)
                self._timer.daemon = True
                self._timer.start()

    def end(self, text: str) -> None:
        """The machine's last line (how the command ended for it): no held-back progress after it."""
        with self._lock:
            self._pending = None
            self._write(text)

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            if self._pending is not None and self._pending != self._last:
                self._write(self._pending)
            self._pending = None

    def _write(self, text: str) -> None:
        self._last, self._written = text, time.monotonic()
        out(f"{self.name}: {text}\n")


class PlainBoard:
    """`web1: creating web1 (local)`, `web1: provisioning: engine : install`, `web1: ready`: the live display's
    information as lines, for logs and CI. On stdout, with the results: stderr carries only errors."""

    def __init__(self, done: str) -> None:
        self._done = done
        self._lines: dict[str, _PlainLine] = {}

    def __enter__(self) -> PlainBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def line(self, name: str) -> Line:
        self._lines[name] = _PlainLine(name)
        return self._lines[name]

    def finish(self, name: str, error: str | None) -> None:
        line = self._lines.pop(name, None) or _PlainLine(name)
        line.end(self._done if error is None else "failed: " + error)


class _LiveLine:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def update(self, text: str) -> None:
        from rich.markup import escape

        self._progress.update(self._task, description=escape(text))

    progress = update  # rich redraws the line at its own pace, however often it changes


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
    if is_terminal():
        return LiveBoard(names, done) if len(names) > 1 else None
    return PlainBoard(done) if len(names) > 1 or plain_for_one else None
