"""The parallel runner behind every command over several machines, and the CLI's summary of its outcomes.

The runner is exercised with plain functions; the CLI with a driver whose machines exist only as records (a test
double of the driver interface, as in test_create_rollback): what is checked here is what the user sees of many
machines at once, while tests/integration/test_fleet.py makes real ones.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from machine import drivers, fleet
from machine.cli import main
from machine.drivers.base import Driver, State
from machine.errors import MachineError
from machine.store import Store

WAIT = 30.0  # generous: the host is shared; nothing here is timed


# -- the runner ------------------------------------------------------------------------------------------------
def test_at_most_n_actions_run_at_once_and_all_of_them_run():
    lock, running, peak, ran = threading.Lock(), [0], [0], []
    together = threading.Barrier(3, timeout=WAIT)  # passes only when 3 actions run at the same moment

    def action(name: str) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if name in ("m0", "m1", "m2"):
            together.wait()
        time.sleep(0.05)
        with lock:
            running[0] -= 1
            ran.append(name)

    names = [f"m{i}" for i in range(7)]
    outcomes = fleet.run(names, action, workers=3)
    assert [o.name for o in outcomes] == names and all(o.error is None for o in outcomes)
    assert sorted(ran) == names and peak[0] == 3


def test_a_failure_is_that_names_outcome_and_the_others_go_on(monkeypatch):
    def action(name: str) -> None:
        if name == "b":
            raise MachineError("b broke")

    sent = []
    monkeypatch.setattr(fleet, "_raise_in", lambda *args: sent.append(args))
    outcomes = fleet.run(["a", "b", "c"], action, workers=2)
    assert [(o.name, str(o.error) if o.error else None) for o in outcomes] == [("a", None), ("b", "b broke"),
                                                                                ("c", None)]
    assert sent == []  # without Ctrl-C no thread is sent an exception, not even one to drop


def test_the_default_is_one_worker_per_name_up_to_eight():
    assert [fleet.default_workers(n) for n in (1, 3, 8, 20)] == [1, 3, 8, 8]


def test_ctrl_c_interrupts_running_actions_so_they_clean_up_and_starts_no_more():
    started, cleaned = threading.Semaphore(0), []

    def action(name: str) -> None:
        try:
            started.release()
            while True:  # a worker busy in Python code (an SSH conversation polls the same way)
                time.sleep(0.05)
        finally:
            cleaned.append(name)  # a create's rollback runs here

    def press_ctrl_c() -> None:
        for _ in range(2):
            assert started.acquire(timeout=WAIT)
        os.kill(os.getpid(), signal.SIGINT)  # to the main thread, as a terminal's Ctrl-C

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    outcomes = fleet.run(["a", "b", "c", "d"], action, workers=2)
    assert sorted(cleaned) == ["a", "b"], outcomes
    assert [(o.name, o.interrupted, o.started) for o in outcomes] == [
        ("a", True, True), ("b", True, True), ("c", True, False), ("d", True, False)]


# Ctrl-C during a fleet run under a tracer, then another run: each prints its outcomes.
TRACED = """
import os, signal, sys, threading, time
from machine import fleet

sys.settrace(lambda *args: None)
threading.settrace(lambda *args: None)
started = threading.Semaphore(0)

def action(name):
    started.release()
    while True:
        time.sleep(0.05)

def press_ctrl_c():
    for _ in range(2):
        started.acquire()
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=press_ctrl_c, daemon=True).start()
print([o.interrupted for o in fleet.run(["a", "b", "c"], action, workers=2)])
print([o.error for o in fleet.run(["d", "e"], lambda name: None)])
"""


def test_a_traced_interpreter_runs_fleets_and_ctrl_c_leaves_it_working():
    # coverage, pdb and IDE debuggers trace every thread; an interrupt's clean-up once made them spin forever.
    proc = subprocess.run([sys.executable, "-c", TRACED], capture_output=True, text=True, timeout=WAIT)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "[True, True, True]\n[None, None]\n", "")


# -- the CLI over several machines -----------------------------------------------------------------------------
class RecordOnlyDriver(Driver):
    """Machines that are records only; the create of a name starting with `bad` fails half-way."""

    name = "record-only"
    makes_key = False

    def create(self) -> None:
        self.machine.record(volume=f"vol-{self.machine.name}")
        if self.machine.name.startswith("bad"):
            raise MachineError("the cloud refused the instance type")

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def remove(self) -> None: ...

    def leftovers(self) -> list[str]:
        return []

    def state(self) -> State:
        return State.RUNNING


DRIVER = RecordOnlyDriver


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setitem(drivers._MODULES, "record-only", __name__)
    monkeypatch.setenv("PYMACHINE_HOME", str(tmp_path / "home"))
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)
    root.setLevel(logging.WARNING)  # not --debug (a test before may have run one), and its cached verdicts gone
    return Store(tmp_path / "home")


def pymachine(capsys, *argv: str) -> tuple[int, str, str]:
    """main() as `pymachine ARGV` runs it (outside a terminal): exit status, stdout, stderr."""
    capsys.readouterr()
    sys.argv = ["pymachine", *argv]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_create_of_several_names_makes_the_others_and_names_the_failure(store, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, out, err = pymachine(capsys, "create", "-d", "record-only", "--no-connect", "web1", "bad2", "web3")
    assert code == 1
    # Outside a terminal, each machine's progress in plain lines; stderr has only the failure, naming its machine.
    assert "web1: creating web1 (record-only)" in out.splitlines()
    assert {"web1: made (no engine yet)", "web3: made (no engine yet)"} <= set(out.splitlines())
    assert "bad2: failed: the cloud refused the instance type" in out.splitlines()
    assert err == "pymachine: error: bad2: the cloud refused the instance type\n"
    assert store.names() == ["web1", "web3"]  # bad2 rolled back


def test_count_names_the_machines_and_names_are_checked_before_anything_is_made(store, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)
    assert pymachine(capsys, "create", "-d", "record-only", "--no-connect", "--count", "3", "web")[0] == 0
    assert store.names() == ["web1", "web2", "web3"]
    for argv, message in [
        (("--count", "4", "web"), "machines web1, web2, web3 already exist"),
        (("new1", "web2"), "machine 'web2' already exists"),
        (("new1", "new1"), "machine name 'new1' is given more than once"),
        (("--count", "2", "a", "b"), "--count makes NAME1 … NAMEN from one NAME: give exactly one"),
        (("new1", "bad name"), "invalid machine name 'bad name'"),
        (("--count", "2", "x" * 63), "longer than 63 characters"),
        (("--count", "0", "web"), "'--count': 0 is not in the range x>=1"),
    ]:
        code, out, err = pymachine(capsys, "create", "-d", "record-only", "--no-connect", *argv)
        assert (code, out) == (2, ""), (argv, err)
        assert err.startswith("pymachine: error: ") and message in err and len(err.splitlines()) == 1, err
    assert store.names() == ["web1", "web2", "web3"]


def test_lifecycle_commands_over_several_names_report_each(store, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)
    assert pymachine(capsys, "create", "-d", "record-only", "--no-connect", "a", "b")[0] == 0
    code, out, err = pymachine(capsys, "stop", "--parallel", "1", "a", "ghost", "b")
    assert code == 1 and err == "pymachine: error: ghost: no machine named 'ghost'\n"
    assert {"a: stopped", "b: stopped", "ghost: failed: no machine named 'ghost'"} <= set(out.splitlines())
    code, out, err = pymachine(capsys, "rm", "-y", "a", "b")
    assert (code, err) == (0, "") and store.names() == []


def test_a_single_create_prints_plain_progress_and_fails_in_one_line(store, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)
    code, out, err = pymachine(capsys, "create", "-d", "record-only", "--no-connect", "solo")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["solo: creating solo (record-only)", "solo: made (no engine yet)"]
    code, out, err = pymachine(capsys, "create", "-d", "record-only", "--no-connect", "bad1")
    assert (code, err) == (1, "pymachine: error: the cloud refused the instance type\n")  # as any command's error
    assert store.names() == ["solo"]
