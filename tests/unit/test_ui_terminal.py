"""ui.is_terminal: rich's answer, given without importing rich where stderr plainly is no terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

_ASK = "import sys; from machine import ui; print(ui.is_terminal(), 'rich' in sys.modules)"


def _ask(env: dict[str, str], stderr: int | None) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    proc = subprocess.run([sys.executable, "-c", _ASK], env=clean | env, stdout=subprocess.PIPE, stderr=stderr,
                          text=True, check=True, timeout=60)
    return proc.stdout.strip()


def test_a_log_is_no_terminal_and_rich_stays_unloaded():
    assert _ask({}, subprocess.DEVNULL) == "False False"


@pytest.mark.parametrize(("env", "expected"),
                         [({"FORCE_COLOR": "1"}, "True True"), ({"TTY_COMPATIBLE": "0"}, "False True")])
def test_the_variables_rich_honours_are_left_to_rich(env, expected):
    assert _ask(env, subprocess.DEVNULL) == expected


def test_a_terminal_is_one():
    leader, follower = pty.openpty()
    try:
        assert _ask({"TERM": "xterm"}, follower) == "True True"
    finally:
        os.close(leader)
        os.close(follower)
