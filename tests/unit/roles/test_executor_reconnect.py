"""A connection lost under a task: the play reconnects and runs the task again from its start.

The commands really run (in a local shell); only the loss of the connection is staged, at a chosen moment."""

from __future__ import annotations

from machine.errors import MachineError
from machine.roles import run_roles
from machine.ssh import ConnectionLost, Result
from tests.unit.roles.conftest import LocalShell
from tests.unit.roles.test_executor import Events


class DroppingShell(LocalShell):
    """Loses the connection right after running a command containing `marker`, `drops` times."""

    def __init__(self, marker: str, drops: int = 1, comes_back: bool = True) -> None:
        super().__init__()
        self.marker, self.drops, self.comes_back = marker, drops, comes_back
        self.reconnects = 0

    def run(self, command: str, **kwargs) -> Result:
        result = super().run(command, **kwargs)
        if self.marker in command and self.drops:
            self.drops -= 1
            raise ConnectionLost("lost the ssh connection to localhost:22 (EOFError)")
        return result

    def reconnect(self, timeout: float) -> None:
        self.reconnects += 1
        if not self.comes_back:
            raise MachineError(f"lost the ssh connection: localhost:22 did not answer within {timeout:.0f}s")


def play(shell, path):
    events = Events()
    recap = run_roles(shell, ["r"], path, reporter=events)
    return recap, events


def test_the_interrupted_task_runs_again_and_its_handler_still_runs(roles, tmp_path):
    target, log = tmp_path / "file", tmp_path / "log"
    path = roles("r", tasks=f"""
        - name: write the file
          copy:
            content: "hello\\n"
            dest: {target}
          notify: file changed
        - name: next task
          shell: echo next >> {log}
        """, handlers=f"""
        - name: file changed
          shell: echo handler >> {log}
        """)
    # The connection drops after the file was written, before the task could report it.
    shell = DroppingShell(marker="mv -f")
    recap, events = play(shell, path)
    assert shell.reconnects == 1
    assert recap.failed == recap.unreachable == 0
    assert target.read_text() == "hello\n"
    # The re-run found the file written; the change the interrupted run made still counts and notifies.
    assert ("r : write the file", "changed") in [r[:2] for r in events.results]
    assert log.read_text().splitlines() == ["next", "handler"]


def test_a_host_that_stays_away_is_unreachable_with_what_was_waited_for(roles, tmp_path):
    path = roles("r", tasks="""
        - name: a command
          command: echo hi
        """)
    shell = DroppingShell(marker="echo hi", comes_back=False)
    recap, _ = play(shell, path)
    assert recap.unreachable == 1 and recap.failed == 0
    assert "localhost:22 did not answer within 60s" in str(recap.failure)


def test_a_task_that_always_loses_the_connection_fails_instead_of_looping(roles, tmp_path):
    path = roles("r", tasks="""
        - name: reboots the host, say
          command: echo bye
        """)
    shell = DroppingShell(marker="echo bye", drops=100)
    recap, _ = play(shell, path)
    assert shell.reconnects == 3
    assert recap.unreachable == 1
    assert "3 times in one task" in str(recap.failure)
