"""What a run tells its caller: one event per task result, and the recap at the end."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO


@dataclass(frozen=True)
class TaskInfo:
    label: str  # "role : task name", as Ansible prints it
    where: str  # "roles/x/tasks/main.yml:12"
    action: str
    handler: bool = False


@dataclass(frozen=True)
class TaskResult:
    status: str  # ok, changed, failed, skipped, included
    msg: str = ""
    diff: str = ""
    item: str | None = None  # the loop item's label, for one item of a loop
    ignored: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    shown: bool = False  # the message is shown even though the task did not fail (debug, assert without quiet)


@dataclass(frozen=True)
class Failure:
    label: str
    where: str
    msg: str

    def __str__(self) -> str:
        return f"{self.where}: task '{self.label}' failed: {self.msg}"


@dataclass
class Recap:
    host: str
    ok: int = 0
    changed: int = 0
    unreachable: int = 0
    failed: int = 0
    skipped: int = 0
    rescued: int = 0
    ignored: int = 0
    failure: Failure | None = None

    @property
    def line(self) -> str:
        return (f"{self.host} : ok={self.ok} changed={self.changed} unreachable={self.unreachable} "
                f"failed={self.failed} skipped={self.skipped} rescued={self.rescued} ignored={self.ignored}")

    def __str__(self) -> str:
        return self.line


class Reporter(Protocol):
    def task_start(self, host: str, task: TaskInfo) -> None: ...

    def task_result(self, host: str, task: TaskInfo, result: TaskResult) -> None: ...

    def recap(self, recap: Recap) -> None: ...


class SilentReporter:
    def task_start(self, host: str, task: TaskInfo) -> None:
        pass

    def task_result(self, host: str, task: TaskInfo, result: TaskResult) -> None:
        pass

    def recap(self, recap: Recap) -> None:
        pass


class TextReporter(SilentReporter):
    """`changed: [web1] => kernel : load modules` lines, diffs when there are some, then the recap."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout

    def task_result(self, host: str, task: TaskInfo, result: TaskResult) -> None:
        prefix = "fatal" if result.status == "failed" and not result.ignored else result.status
        if result.status == "skipped":
            prefix = "skipping"
        line = f"{prefix}: [{host}] => {'HANDLER ' if task.handler else ''}{task.label}"
        if result.item is not None:
            line += f" (item={result.item})"
        if result.msg and (result.status == "failed" or result.shown):
            line += f": {result.msg}"
        if result.ignored:
            line += " ...ignoring"
        print(line, file=self.stream)
        if result.diff:
            print(result.diff.rstrip("\n"), file=self.stream)

    def recap(self, recap: Recap) -> None:
        print(recap.line, file=self.stream)
        if recap.failure:
            print(str(recap.failure), file=self.stream)
