"""What `ls` lists while other commands change the store."""

from __future__ import annotations

from machine.commands import queries
from machine.store import Store


class RemovedWhileListed(Store):
    """A store whose machine `gone` is removed (as an rm running meanwhile would) right after it is listed."""

    def names(self) -> list[str]:
        listed = super().names()
        with self.locked("gone") as machine:
            self.delete(machine)
        return listed


def test_a_machine_removed_while_ls_runs_is_not_listed_as_an_error(tmp_path):
    store = RemovedWhileListed(tmp_path)
    for name in ("gone", "kept"):
        with store.reserve(name, "local", {}) as machine:
            machine.state = "ready"
            machine.save()
    assert [(row["name"], row["state"], row["error"]) for row in queries.ls(store)] == [("kept", "Stopped", "")]
