"""OpenSSH's multiplexing protocol (its PROTOCOL.mux), spoken to a master's control socket (machine.sshmux).

What `ssh` does when it finds a master, without a process of its own: a session is asked for with three pipes
passed over the socket (SCM_RIGHTS), and the master sends their data through its connection itself. An `ssh` per
session cost ~5 ms of CPU to start (each machine of a fleet pays it at every command); this costs a few system
calls. The master stays OpenSSH's: logins, host keys, crypto and the idle timeout remain its own.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

_VERSION = 4
_HELLO = 0x00000001
_NEW_SESSION, _ALIVE_CHECK, _TERMINATE = 0x10000002, 0x10000004, 0x10000005
_OK, _PERMISSION_DENIED, _FAILURE, _EXIT_MESSAGE = 0x80000001, 0x80000002, 0x80000003, 0x80000004
_ALIVE, _SESSION_OPENED = 0x80000005, 0x80000006
_NO_ESCAPE = 0xFFFFFFFF
_MAX_MESSAGE = 256 * 1024  # the master's own limit


class MuxError(OSError):
    """The master refused a request, spoke out of turn, or is gone: as a failed ssh connection, an OSError."""


class Refused(MuxError):
    """The master answered, and said no: for a session, the host refused it one more channel (sshd's MaxSessions,
    say); the connection itself may still serve the sessions it has."""


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _u32(data: bytes, at: int = 0) -> int:
    """The uint32 at `at` of a message from the master; MuxError if the message is too short for it."""
    if len(data) < at + 4:
        raise MuxError("the master sent a message too short for its kind")
    return struct.unpack(">I", data[at:at + 4])[0]


class Control:
    """One connection to a master's control socket, after the hello exchange."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._buffer = b""
        self._request = 0
        try:
            self.sock.connect(str(path))
            self.send(struct.pack(">II", _HELLO, _VERSION))
            kind, body = self.receive()
            if kind != _HELLO or _u32(body) != _VERSION:
                raise MuxError(f"{path}: not a master of mux protocol version {_VERSION}")
        except BaseException:
            self.sock.close()
            raise

    def send(self, message: bytes) -> None:
        self.sock.sendall(_string(message))

    def receive(self) -> tuple[int, bytes]:
        """The next message (kind, body), waiting for it; MuxError once the master closed the connection."""
        while (message := self._take()) is None:
            self._read()
        return message

    def arrived(self) -> tuple[int, bytes] | None:
        """The next message if it came whole, without waiting (the socket made non-blocking); MuxError once the
        master closed the connection."""
        while (message := self._take()) is None:
            try:
                self._read()
            except BlockingIOError:
                return None
        return message

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise MuxError("the master closed the control connection")
        self._buffer += data

    def _take(self) -> tuple[int, bytes] | None:
        if len(self._buffer) < 8:
            return None
        length = _u32(self._buffer)
        if not 4 <= length <= _MAX_MESSAGE:
            raise MuxError(f"the master sent a message of {length} bytes")
        if len(self._buffer) < 4 + length:
            return None
        kind, body = _u32(self._buffer, 4), self._buffer[8:4 + length]
        self._buffer = self._buffer[4 + length:]
        return kind, body

    def request(self, kind: int, body: bytes = b"", fds: list[int] | None = None) -> tuple[int, bytes]:
        """Send a request (then `fds`, one message each, as ssh sends them); its reply's kind and the body after
        the echoed request id. MuxError on a refusal."""
        self._request += 1
        self.send(struct.pack(">II", kind, self._request) + body)
        for fd in fds or ():
            socket.send_fds(self.sock, [b"\0"], [fd])
        kind, answer = self.receive()
        if kind in (_PERMISSION_DENIED, _FAILURE):
            raise Refused(f"the master refused: {answer[8:8 + _u32(answer, 4)].decode(errors='replace')}")
        if _u32(answer) != self._request:
            raise MuxError("the master answered another request")
        return kind, answer[4:]

    def close(self) -> None:
        self.sock.close()


def alive(path: Path, timeout: float) -> bool:
    """True if a master answers on `path` (one that lost its connection may still accept a moment)."""
    return _answered(path, _ALIVE_CHECK, _ALIVE, timeout)


def terminate(path: Path, timeout: float) -> bool:
    """Ask the master on `path` to end now, with its sessions; True if it acknowledged (OpenSSH's often ends
    before its acknowledgement leaves: only a master that was never there is sure to give False)."""
    return _answered(path, _TERMINATE, _OK, timeout)


def _answered(path: Path, request: int, reply: int, timeout: float) -> bool:
    try:
        with contextlib.closing(Control(path, timeout)) as control:
            return control.request(request)[0] == reply
    except OSError:
        return False


class Session:
    """`command` run on the master's host, its stdin, stdout and stderr pipes of ours: machine.sshshell's stream.

    Ends with the master's exit message, or without one (255, as ssh exits) when the master closed the control
    connection first: the connection failed, or the remote command was killed by a signal."""

    def __init__(self, path: Path, command: str, timeout: float, answers: Callable[[], bool]) -> None:
        self._answers = answers  # () -> bool: the master still answers (lost() tells the two endings apart)
        self.group: int | None = None  # the remote session's process group, once its first line arrived
        self._head = b""
        self._status: int | None = None
        self._closed = False  # the control connection ended
        control: Control | None = None
        ours: list[int] = []
        theirs: list[int] = []
        try:  # whatever fails or is interrupted (Ctrl-C) on the way leaves no descriptor open
            for _ in range(3):
                read, write = os.pipe()
                ours.append(read)
                theirs.append(write)
            ours[0], theirs[0] = theirs[0], ours[0]  # stdin: we write, the master reads
            control = Control(path, timeout)
            flags = struct.pack(">IIIII", 0, 0, 0, 0, _NO_ESCAPE)  # no tty, X11, agent, subsystem nor escape
            kind, _ = control.request(_NEW_SESSION, _string(b"") + flags + _string(b"") + _string(command.encode()),
                                      fds=theirs)
            if kind != _SESSION_OPENED:
                raise MuxError(f"the master answered a session request with message {kind:#x}")
            while theirs:
                os.close(theirs.pop())  # the master holds its copies now
            for fd in ours[1:]:
                os.set_blocking(fd, False)
            control.sock.setblocking(False)  # from now on only read when select() says so
        except BaseException:
            if control is not None:
                control.close()
            for fd in ours + theirs:
                os.close(fd)
            raise
        self._control = control
        self._stdin, self._stdout, self._stderr = ours
        self._open = {self._stdout, self._stderr}  # the pipes not at their end yet

    # -- machine.sshshell's Stream --------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._stdin, view):]

    def _drain(self, fd: int) -> bytes:
        got = bytearray()
        while fd in self._open:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                self._open.discard(fd)
            got += data
        return bytes(got)

    def read(self) -> tuple[bytes, bytes]:
        out, err = self._drain(self._stdout), self._drain(self._stderr)
        if self.group is None and out:
            line, newline, out = (self._head + out).partition(b"\n")
            if not newline:
                self._head = line
                return b"", err
            self.group = int(line) if line.isdigit() else 0  # 0: unknown (something printed before it)
        return out, err

    def _poll(self) -> None:
        """Take what the master sent on the control connection: the exit message, or the connection's end (a
        message that makes no sense ends it too)."""
        while not self._closed:
            try:
                message = self._control.arrived()
                if message is None:
                    return
                if message[0] == _EXIT_MESSAGE:
                    self._status = _u32(message[1], 4)
            except OSError:
                self._closed = True

    def wait(self, timeout: float) -> None:
        watched = [*self._open] or ([self._control.sock] if not self._closed and self._status is None else [])
        if watched:
            select.select(watched, [], [], timeout)
        self._poll()

    def exit_status(self) -> int | None:
        """The remote command's status once it ended and all it wrote was read; None until then."""
        if self._open:
            return None
        self._poll()
        if self._status is not None:
            return self._status
        return 255 if self._closed else None

    def ended(self) -> bool:
        # After a broken pipe: the master closed the session's stdin, so the session is ending.
        deadline = time.monotonic() + 5.0
        while self._status is None and not self._closed and time.monotonic() < deadline:
            select.select([self._control.sock], [], [], max(0.0, deadline - time.monotonic()))
            self._poll()
        return self._status is not None or self._closed

    def lost(self) -> bool:
        return self._status is None and not self._answers()

    def lost_reason(self, stderr: bytes) -> str:
        return "the kept connection ended the session"

    def close(self) -> None:
        # Closing the control connection makes the master close the session; the remote shell ends with it.
        self._control.close()
        for fd in (self._stdin, self._stdout, self._stderr):
            with contextlib.suppress(OSError):
                os.close(fd)
