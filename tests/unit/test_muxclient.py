"""machine.muxclient against a stand-in for OpenSSH's master (tests/unit/mux_master_stub.py): a process that
speaks PROTOCOL.mux on a socket and runs each session's command with a local `sh` on the descriptors it was
passed. The real master is spoken to by the integration suite (tests/integration/test_provision_faults.py: one
login for many commands, Ctrl-C, a killed connection, a shell killed by a signal)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine import muxclient
from machine.sshshell import Reply, Shell

STUB = Path(__file__).with_name("mux_master_stub.py")


class FakeMaster:
    """tests/unit/mux_master_stub.py in a process of its own, serving on `path`; the pids of the sessions' shells
    in `pids()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.process = subprocess.Popen([sys.executable, str(STUB), str(path)])
        deadline = time.monotonic() + 10
        while not path.exists():
            assert time.monotonic() < deadline and self.process.poll() is None, "the stub master did not start"
            time.sleep(0.01)

    def refuse(self, reason: str) -> None:
        self.path.with_suffix(".refuse").write_text(reason)

    def pids(self) -> list[int]:
        pids = self.path.with_suffix(".pids")
        return [int(line) for line in pids.read_text().split()] if pids.exists() else []

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def master() -> Iterator[FakeMaster]:
    directory = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))  # short: a socket's path has ~104 bytes
    fake = FakeMaster(directory / "master")
    yield fake
    fake.close()
    shutil.rmtree(directory)


def shell_on(master: FakeMaster, launcher: str, answers=lambda: True) -> tuple[Shell, muxclient.Session]:
    session = muxclient.Session(master.path, f"echo $$; exec {launcher}", 5, answers)
    return Shell(session), session


def test_the_kept_shell_over_a_session(master):
    shell, session = shell_on(master, "sh")
    try:
        assert shell.run("echo out; echo err >&2; exit 3", None, 5) == Reply(3, b"out\n", b"err\n")
        assert session.group == master.pids()[0]  # the session's process group, for Ctrl-C
        binary = bytes(range(256)) * 1024  # more than a pipe's buffer holds at once
        assert shell.run("od -An -c | wc -l", binary, 5).stdout.strip() == str(len(binary) // 16).encode()
        assert shell.run("cat", b"text\n", 5).stdout == b"text\n"
    finally:
        shell.close()
    deadline = time.monotonic() + 5
    while Path(f"/proc/{master.pids()[0]}").exists():  # the shell reads EOF and ends
        assert time.monotonic() < deadline, "the session's shell outlived its session"
        time.sleep(0.01)


def test_a_launcher_that_fails_is_the_commands_result(master):
    shell, _ = shell_on(master, "sh -c 'echo refused >&2; exit 7'")
    assert shell.run("echo never", None, 5) == Reply(7, b"", b"refused\n", ended=True)
    shell.close()


def test_a_shell_killed_by_a_signal_ends_without_a_status(master):
    answering = [True]
    shell, session = shell_on(master, "sh", lambda: answering[0])
    assert shell.run("kill -KILL $$", None, 5) == Reply(255, b"", b"", ended=True)
    assert not session.lost()  # the master still answers: the shell ended, the connection did not
    answering[0] = False
    assert session.lost()
    shell.close()


def test_a_refused_session_a_garbled_reply_and_a_gone_master_are_errors(master):
    before = sorted(os.listdir("/proc/self/fd"))
    master.refuse("open failed")
    with pytest.raises(muxclient.Refused, match="the master refused: open failed"):
        shell_on(master, "sh")
    master.path.with_suffix(".refuse").unlink()
    master.path.with_suffix(".short").touch()
    with pytest.raises(muxclient.MuxError, match="too short") as garbled:  # a lost connection to the caller
        shell_on(master, "sh")
    master.close()
    with pytest.raises(OSError) as gone:
        shell_on(master, "sh")
    assert not isinstance(garbled.value, muxclient.Refused) and not isinstance(gone.value, muxclient.Refused)
    assert sorted(os.listdir("/proc/self/fd")) == before  # no pipe nor socket of a failed start left open


def test_alive_and_terminate(master):
    assert muxclient.alive(master.path, 5)
    assert muxclient.terminate(master.path, 5)
    assert not muxclient.alive(master.path, 5) and not muxclient.terminate(master.path, 5)
    assert not muxclient.alive(master.path.with_name("none"), 5)

