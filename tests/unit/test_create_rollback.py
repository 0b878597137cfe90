"""A failed create is rolled back; when the rollback fails too, the user sees why and the record stays."""

from __future__ import annotations

import pytest

from machine import commands, drivers
from machine.drivers.base import Driver, State
from machine.errors import MachineError
from machine.ssh import Endpoint
from machine.store import Store


class HalfMadeDriver(Driver):
    """A driver (a test double of the interface) whose create fails and whose removal leaves a volume behind."""

    name = "half-made"
    removable = False

    def create(self) -> None:
        self.machine.record(volume="v1")
        raise MachineError("the cloud refused the instance type")

    def remove(self) -> None:
        if not HalfMadeDriver.removable:
            raise MachineError("cannot delete volume v1: in use")

    def leftovers(self) -> list[str]:
        return [] if HalfMadeDriver.removable else ["volume v1"]

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def state(self) -> State:
        return State.STOPPED

    def ip(self) -> str | None:
        return None

    def ssh_endpoint(self) -> Endpoint:
        raise MachineError("no address")


DRIVER = HalfMadeDriver


@pytest.fixture
def half_made(monkeypatch):
    monkeypatch.setitem(drivers._MODULES, "half-made", __name__)
    monkeypatch.setattr(HalfMadeDriver, "removable", False)
    return HalfMadeDriver


def test_the_create_error_is_raised_and_the_failed_cleanup_reported(tmp_path, half_made, capsys):
    store = Store(tmp_path)
    with pytest.raises(MachineError, match="refused the instance type"):
        commands.create(store, "w", "half-made", {}, provision=False)
    err = capsys.readouterr().err
    assert "cleaning up after the failed create of w failed" in err and "left: volume v1" in err
    # The record stays, so that `rm -f` can finish the job once the volume can go.
    assert store.names() == ["w"] and store.load("w").state == "error"
    assert store.load("w").resources == {"volume": "v1"}
    with pytest.raises(MachineError, match="left: volume v1"):
        commands.rm(store, "w", force=True)
    half_made.removable = True
    commands.rm(store, "w", force=True)
    assert store.names() == []


def test_rm_without_force_stops_at_a_driver_error_even_with_nothing_left(tmp_path, half_made, monkeypatch):
    store = Store(tmp_path)
    with pytest.raises(MachineError):
        commands.create(store, "w", "half-made", {}, provision=False)
    monkeypatch.setattr(HalfMadeDriver, "leftovers", lambda self: [])
    with pytest.raises(MachineError, match="in use"):
        commands.rm(store, "w")
    assert store.names() == ["w"]
    commands.rm(store, "w", force=True)
    assert store.names() == []

