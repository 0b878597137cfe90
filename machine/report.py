"""How the CLI shows a provisioning run: every task for `provision`, a spinner (or the machine's line) for the rest."""

from __future__ import annotations

import io
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


class _OnLine(SilentReporter):
    """The current task on the machine's own line (a command over several machines, or a log)."""

    def __init__(self, line: ui.Line) -> None:
        self._line = line

    def task_start(self, host: str, task: TaskInfo) -> None:
        self._line.update(f"provisioning: {task.label}")


class _Both(SilentReporter):
    def __init__(self, *reporters: Reporter) -> None:
        self._reporters = reporters

    def task_start(self, host: str, task: TaskInfo) -> None:
        for r in self._reporters:
            r.task_start(host, task)

    def task_result(self, host: str, task: TaskInfo, result: TaskResult) -> None:
        for r in self._reporters:
            r.task_result(host, task, result)

    def recap(self, recap: Recap) -> None:
        for r in self._reporters:
            r.recap(recap)


def progress() -> Reporter:
    line = ui.current_line()
    if line is not None:
        return _OnLine(line)
    return _Spinner() if ui.is_terminal() else SilentReporter()


def tasks(stream: io.StringIO | None = None) -> Reporter:
    """Ansible-style lines on stdout (the command's own output, so also when piped), or into `stream` (one
    machine's block of a command over several, printed whole) while its line shows the current task."""
    if stream is None:
        return TextReporter(sys.stdout)
    return _Both(TextReporter(stream), progress())
