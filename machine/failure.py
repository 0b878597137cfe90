"""How a failure reaches the user: one line on stderr (a traceback only with --debug) and an exit status."""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import NoReturn

from machine import ui
from machine.errors import MachineError


def describe(error: BaseException) -> str:
    """One line for the user: a failure's own message, the file an OS error is about, or an internal error."""
    if isinstance(error, MachineError):
        text = str(error)
    elif isinstance(error, OSError) and error.strerror:
        text = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        text = f"internal error: {detail} (run with --debug for the traceback)"
    # A message may quote a tool's multi-line output; the user still gets one line per failure.
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())


def exit_code(error: BaseException) -> int:
    return error.exit_code if isinstance(error, MachineError) else 1


def debugging() -> bool:
    """--debug (the root logger at DEBUG, also when an embedding configured it; never, if nothing imported logging)."""
    logging = sys.modules.get("logging")
    return bool(logging and logging.getLogger().isEnabledFor(logging.DEBUG))


def print_traceback(error: BaseException) -> None:
    """With --debug, the traceback of a failure."""
    if debugging():
        import traceback  # here: only --debug prints one

        traceback.print_exception(error)


# The signal that stopped the command as Ctrl-C does, if one did: the rollback is Ctrl-C's, the word and exit
# status (128 + its number, as a shell gives) are its own.
_stopped_by: int | None = None


def stop_on_signals() -> None:
    """SIGTERM (`timeout`, a CI job cancelled, systemd, `docker stop`) and SIGHUP (a closed terminal) stop the
    command as Ctrl-C does, in the main thread: a create rolls back, and nothing it made is left running."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _as_ctrl_c)


def _as_ctrl_c(signum: int, _frame: FrameType | None) -> None:
    global _stopped_by
    _stopped_by = signum
    raise KeyboardInterrupt


def interruption() -> tuple[str, int]:
    """How a command stopped by Ctrl-C (or by a signal standing for it) says so, and its exit status."""
    if _stopped_by is None:
        return "interrupted", 130
    return f"terminated ({signal.Signals(_stopped_by).name})", 128 + _stopped_by


def exit_with(error: BaseException) -> NoReturn:
    """End the command for a failure it did not handle: Ctrl-C is 130, anything else one line and its status."""
    if isinstance(error, KeyboardInterrupt):
        word, status = interruption()
        ui.err(word)
        raise SystemExit(status) from None
    ui.err(f"error: {describe(error)}")
    print_traceback(error)
    raise SystemExit(exit_code(error)) from None
