"""A shell kept running on one SSH session, fed one command after another (machine.ssh's `run(shell=…)`).

A command on a channel of its own costs a channel open, an exec request, a fork and exec of the login shell in
sshd and, for a user who is not root, a run of sudo (PAM, sudoers, a log line): more than most of the probes a
provisioning run makes. Here the launcher (`sh`, or `sudo -n -H -u root -- sh`) starts once; each command then
costs one exchange of data and the command's own processes. Every command still runs in a process of its own
(its stdin redirected, never the shell's), so commands share no state but what sudo set up once: environment,
working directory and umask, the same for each as with one sudo per command.

The shell runs on a Stream: a paramiko channel (ChannelStream, below) or a session of a connection kept between
commands (machine.muxclient.Session).

The protocol: the client writes `( COMMAND\n) <REDIRECT` (a subshell: the command changes nothing of the shell)
and a line printing a marker with `$?` on stdout and the marker on stderr. The marker is random per shell, so
no command's output can contain it.
"""

from __future__ import annotations

import base64
import secrets
import select
import shlex
import time
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Reply:
    rc: int
    stdout: bytes
    stderr: bytes
    # The shell itself ended (its launcher failed, e.g. sudo refused, or it was killed): rc is the shell's exit
    # status, the output all it wrote, and the shell cannot take another command.
    ended: bool = False


class ShellTimeout(Exception):
    pass


class Stream(Protocol):
    """Where a shell runs: a paramiko channel (ChannelStream) or a kept connection's session (machine.muxclient)."""

    def send(self, data: bytes) -> None: ...
    def read(self) -> tuple[bytes, bytes]: ...  # stdout and stderr that arrived, without waiting
    def wait(self, timeout: float) -> None: ...  # until more arrives, the far end ends, or `timeout`
    def exit_status(self) -> int | None: ...  # once the far end ended and everything was read
    def ended(self) -> bool: ...  # after a failed send: the far end ended (rather than the transport failed)
    def lost(self) -> bool: ...  # after it ended: the connection under it failed (the shell did not just exit)
    def lost_reason(self, stderr: bytes) -> str: ...
    def close(self) -> None: ...

    # The remote shell's process group, for Ctrl-C to end what it runs when no other way can; None if unknown.
    group: int | None


class ChannelStream:
    """A paramiko channel as a Stream; `launcher` is started on it."""

    group = None  # machine.ssh ends the connection's sessions after Ctrl-C

    def __init__(self, channel: Any, launcher: str) -> None:
        self.channel = channel
        # exec_command, not invoke_shell: no terminal, so no echo, no prompt, and stdout apart from stderr.
        channel.exec_command(launcher)

    def send(self, data: bytes) -> None:
        self.channel.sendall(data)

    def read(self) -> tuple[bytes, bytes]:
        out, err = bytearray(), bytearray()
        drain(self.channel.recv_ready, self.channel.recv, out, "stdout", None)
        drain(self.channel.recv_stderr_ready, self.channel.recv_stderr, err, "stderr", None)
        return bytes(out), bytes(err)

    def wait(self, timeout: float) -> None:
        if self.channel.eof_received:
            # After EOF the channel stays readable; wait for the exit status instead of spinning.
            self.channel.status_event.wait(timeout)
        else:
            select.select([self.channel], [], [], timeout)

    def exit_status(self) -> int | None:
        chan = self.channel
        if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            return chan.exit_status
        return None

    def ended(self) -> bool:
        return self.channel.exit_status_ready()

    def lost(self) -> bool:
        # Without an exit status, the channel ended with the transport under it (a shell killed by a signal also
        # has none, but its channel saw EOF on a live transport).
        chan = self.channel
        return chan.exit_status == -1 and not (chan.eof_received and chan.get_transport().is_active())

    def lost_reason(self, stderr: bytes) -> str:
        cause = self.channel.get_transport().get_exception()
        return str(cause) or type(cause).__name__ if cause else ""

    def close(self) -> None:
        self.channel.close()  # the shell reads EOF and exits


class Shell:
    """The shell a launcher started on `stream` (the launcher's output, if any, is the first command's)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._marker = f"@@pm-{secrets.token_hex(16)}"

    def request(self, command: str, stdin: bytes | None) -> bytes:
        """What the shell is sent to run `command` with `stdin`, then report its status and end its output."""
        m = self._marker
        if stdin is None:
            head, body = f"( {command}\n) </dev/null\n", b""
        elif stdin.endswith(b"\n") and b"\0" not in stdin:
            # A here-document takes text verbatim when its delimiter is quoted (no expansion of any kind).
            head, body = f"( {command}\n) <<'{m}'\n", stdin + f"{m}\n".encode()
        else:  # anything else (binary, no final newline) travels in base64
            decode = "base64 -d | sh -c \"$1\""
            head = f"sh -c {shlex.quote(decode)} sh {shlex.quote(command)} <<'{m}'\n"
            body = base64.encodebytes(stdin) + f"{m}\n".encode()
        tail = f"printf '\\n%s %d\\n' {m} $?; printf '\\n%s\\n' {m} >&2\n"
        return head.encode() + body + tail.encode()

    def run(self, command: str, stdin: bytes | None, timeout: float | None) -> Reply:
        """Run one command; EOFError, paramiko.SSHException or OSError if the transport fails under it,
        ShellTimeout after `timeout` seconds (the shell is then busy for good: close it)."""
        stream = self.stream
        try:
            stream.send(self.request(command, stdin))
        except OSError:
            if not stream.ended():
                raise
            # The shell ended before it was sent anything (sudo refused at once): what it said is the reply.
        out, err = bytearray(), bytearray()
        status: int | None = None
        err_done = False
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            more_out, more_err = stream.read()
            out += more_out
            err += more_err
            if status is None:
                status = self._status(out)
            if not err_done:
                err_done = self._end(err, f"\n{self._marker}\n".encode())
            if status is not None and err_done:
                return Reply(status, bytes(out), bytes(err))
            ended = stream.exit_status()
            if ended is not None:
                return Reply(ended, bytes(out), bytes(err), ended=True)
            if not (more_out or more_err):
                if deadline is not None and time.monotonic() > deadline:
                    raise ShellTimeout()
                stream.wait(0.5)

    def _status(self, out: bytearray) -> int | None:
        """The command's exit status once the marker line ended its stdout (which is then cut off), else None."""
        head = f"\n{self._marker} ".encode()
        start = out.find(head)
        if start < 0:
            return None
        end = out.find(b"\n", start + len(head))
        if end < 0:
            return None
        status = int(out[start + len(head):end])
        del out[start:]
        return status

    @staticmethod
    def _end(err: bytearray, line: bytes) -> bool:
        start = err.find(line)
        if start < 0:
            return False
        del err[start:]
        return True

    def close(self) -> None:
        self.stream.close()


def drain(ready, recv, buffer: bytearray, kind: str, stream) -> bool:
    """Move what a channel has buffered into `buffer` (and `stream(kind, data)`); True if there was anything."""
    got = False
    while ready():
        data = recv(65536)
        buffer += data
        got = True
        if stream:
            stream(kind, data)
    return got
