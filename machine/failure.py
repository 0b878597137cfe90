"""How a failure reaches the user: one line on stderr (a traceback only with --debug) and an exit status."""

from __future__ import annotations

import sys
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


def exit_with(error: BaseException) -> NoReturn:
    """End the command for a failure it did not handle: Ctrl-C is 130, anything else one line and its status."""
    if isinstance(error, KeyboardInterrupt):
        ui.err("interrupted")
        raise SystemExit(130) from None
    ui.err(f"error: {describe(error)}")
    print_traceback(error)
    raise SystemExit(exit_code(error)) from None
