"""Run one command's action on many machines at once: a bounded number of worker threads, every outcome kept.

Threads, not processes: the work is waiting (on SSH, on a boot, on apt in the machine), and everything a worker
touches is its own or guarded: a machine's record by its lock (an flock on a file each call opens, which
excludes other threads as it excludes other processes), the host-wide lease tables, the image cache and the CA
by flocks of the same kind, a paramiko transport per connection.

Ctrl-C reaches the main thread only. The runner then starts no further action and raises KeyboardInterrupt in
every running one, as Ctrl-C would in a single command, so each runs its own cleanup (a create rolls back, an
SSH command is stopped on the host); it waits for them all to end.
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_WORKERS = 8


@dataclass(frozen=True)
class Outcome:
    name: str
    error: BaseException | None = None
    started: bool = True

    @property
    def interrupted(self) -> bool:
        return isinstance(self.error, KeyboardInterrupt)


def default_workers(count: int) -> int:
    return max(1, min(MAX_WORKERS, count))


def run(names: Sequence[str], action: Callable[[str], object], workers: int | None = None) -> list[Outcome]:
    """Call `action(name)` for every name on at most `workers` threads; the outcomes in the order of `names`.

    A failure (any exception) is that name's outcome and the others go on. After Ctrl-C, the names not yet
    started get an interrupted outcome with `started=False`. One name runs in the calling thread, as any command."""
    if len(names) == 1:
        try:
            action(names[0])
        except BaseException as e:  # as a worker's: the caller reports it
            return [Outcome(names[0], e)]
        return [Outcome(names[0])]
    return _Runner(action).run(list(names), workers or default_workers(len(names)))


class _Runner:
    def __init__(self, action: Callable[[str], object]) -> None:
        self._action = action
        self._lock = threading.Lock()
        self._queue: deque[str] = deque()
        self._running: dict[int, str] = {}  # thread ident -> the name its action works on
        self._interrupted: set[int] = set()  # the threads Ctrl-C was sent to
        self._outcomes: dict[str, Outcome] = {}
        self._cancelled = False
        self._live = 0  # workers not ended yet; the last one to end sets _ended
        self._ended = threading.Event()

    def run(self, names: list[str], workers: int) -> list[Outcome]:
        self._queue.extend(names)
        threads = [threading.Thread(target=self._work, name=f"fleet-{i}") for i in range(min(workers, len(names)))]
        self._live = len(threads)
        try:
            for thread in threads:
                thread.start()  # waits for the thread to run: Ctrl-C may come here
        except KeyboardInterrupt:
            self._interrupt()
        # Waited for in short steps, not joined: a join that Ctrl-C interrupts marks a running thread stopped
        # (Python 3.11's threading, bpo-45274), and the kernel may hand SIGINT to a worker, which would not wake
        # a main thread blocked in join for good. The last worker's _ended ends the wait at once; a thread that
        # Ctrl-C kept from starting never counts down, and the liveness check still ends the wait.
        while any(thread.is_alive() for thread in threads):
            try:
                self._ended.wait(0.1)
            except KeyboardInterrupt:  # again while waiting: interrupt what still runs (a slow rollback too)
                self._interrupt()
        return [self._outcomes.get(n) or Outcome(n, KeyboardInterrupt(), started=False) for n in names]

    def _interrupt(self) -> None:
        with self._lock:
            self._cancelled = True
            for ident in self._running:
                _raise_in(ident, KeyboardInterrupt)
                self._interrupted.add(ident)

    def _next(self) -> str | None:
        """The next name, registered as this thread's, or None when there is none or Ctrl-C was pressed."""
        with self._lock:
            if self._cancelled or not self._queue:
                return None
            name = self._queue.popleft()
            self._running[threading.get_ident()] = name
            return name

    def _leave(self) -> None:
        """Unregister this thread; an interrupt sent after its action ended (not yet raised) is dropped."""
        while True:
            try:
                ident = threading.get_ident()
                with self._lock:
                    self._running.pop(ident, None)
                    interrupted = ident in self._interrupted
                if interrupted:
                    # Not cleared by sending NULL: CPython 3.11 then keeps its flag of a pending exception set for
                    # good, and a traced interpreter (coverage, pdb) spins forever. Replaced instead by one raised
                    # right here.
                    try:
                        _raise_in(ident, _Dropped)
                        _checkpoint()
                    except _Dropped:
                        pass
                return
            except KeyboardInterrupt:  # Ctrl-C again, sent before this thread was unregistered: dropped too
                continue

    def _work(self) -> None:
        try:
            self._serve()
        finally:
            with self._lock:
                self._live -= 1
                if self._live == 0:
                    self._ended.set()

    def _serve(self) -> None:
        while True:
            name = None
            try:
                name = self._next()
                if name is None:
                    return
                try:
                    self._action(name)
                    outcome = Outcome(name)
                except BaseException as e:  # every failure, Ctrl-C included, is this name's outcome
                    outcome = Outcome(name, e)
                self._outcomes[name] = outcome
                self._leave()
            except KeyboardInterrupt:
                # Sent as the action ended, and raised here rather than in it: the outcome (if kept) stands.
                self._leave()
                if name is not None and name not in self._outcomes:
                    self._outcomes[name] = Outcome(name, KeyboardInterrupt())


class _Dropped(BaseException):
    """Takes the place of an interrupt that arrived after its action ended."""


def _checkpoint() -> None:
    """A call of a Python function: where CPython raises an exception sent to the thread, at the latest."""


def _raise_in(ident: int, exception: type[BaseException]) -> None:
    """Raise `exception` in thread `ident` at its next Python instruction (replacing one not raised yet)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exception))
