"""How the CLI shows a provisioning run: every task for `provision`, a spinner for the rest."""

from __future__ import annotations

import sys

from machine import ui
from machine.roles.report import Recap, Reporter, SilentReporter, TaskInfo, TaskResult, TextReporter


class _Spinner(SilentReporter):
    """The current task in a status line on a terminal; what changed stays on screen."""

    def __init__(self) -> None:
        self._status = ui.console.status("provisioning")
        self._started = False

    def task_start(self, host: str, task: TaskInfo) -> None:
        if not self._started:  # not before: create shows its own steps until provisioning begins
            self._status.start()
            self._started = True
        self._status.update(f"{host}: {task.label}")

    def task_result(self, host: str, task: TaskInfo, result: TaskResult) -> None:
        if result.status == "changed":
            ui.console.print(f"[yellow]changed[/] {host}: {task.label}")

    def recap(self, recap: Recap) -> None:
        if self._started:
            self._status.stop()
        ui.console.print(recap.line)


def progress() -> Reporter:
    return _Spinner() if ui.console.is_terminal else SilentReporter()


def tasks() -> Reporter:
    """Ansible-style lines on stdout (the command's own output, so also when piped)."""
    return TextReporter(sys.stdout)
