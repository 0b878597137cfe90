"""A stand-in for OpenSSH's master, for tests/unit/test_muxclient.py: `python mux_master_stub.py SOCKET`.

Speaks PROTOCOL.mux: the hello, alive checks, terminate (the process ends), and sessions: the command runs in
`sh -c` on the three descriptors passed, its pid appended to SOCKET.pids; the exit message follows unless it was
killed by a signal (OpenSSH's master sends none then). A session is refused with the text of SOCKET.refuse, if
that file exists, and answered with a message cut short if SOCKET.short does."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path


def read(sock: socket.socket) -> bytes:
    (length,) = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))
    return sock.recv(length, socket.MSG_WAITALL)


def send(sock: socket.socket, message: bytes) -> None:
    sock.sendall(struct.pack(">I", len(message)) + message)


def string_at(data: bytes, at: int) -> tuple[bytes, int]:
    (length,) = struct.unpack(">I", data[at:at + 4])
    return data[at + 4:at + 4 + length], at + 4 + length


def serve(sock: socket.socket, path: Path) -> None:
    with sock:
        send(sock, struct.pack(">II", 0x1, 4))
        if struct.unpack(">II", read(sock)) != (0x1, 4):
            return
        while True:
            message = read(sock)
            kind, rid = struct.unpack(">II", message[:8])
            if kind == 0x10000004:  # alive check
                send(sock, struct.pack(">III", 0x80000005, rid, os.getpid()))
            elif kind == 0x10000005:  # terminate
                send(sock, struct.pack(">II", 0x80000001, rid))
                os._exit(0)
            elif kind == 0x10000002:  # a new session
                session(sock, rid, message[8:], path)
                return


def session(sock: socket.socket, rid: int, body: bytes, path: Path) -> None:
    fds = [socket.recv_fds(sock, 1, 1)[1][0] for _ in range(3)]
    _, at = string_at(body, 0)  # reserved
    if struct.unpack(">IIIII", body[at:at + 20]) != (0, 0, 0, 0, 0xFFFFFFFF):  # no tty, X11, agent, subsystem
        raise SystemExit("unexpected session flags")
    _, at = string_at(body, at + 20)  # terminal type
    command, _ = string_at(body, at)
    refuse = path.with_suffix(".refuse")
    if refuse.exists():
        for fd in fds:
            os.close(fd)
        reason = refuse.read_bytes()
        send(sock, struct.pack(">III", 0x80000003, rid, len(reason)) + reason)
        return
    if path.with_suffix(".short").exists():  # a reply cut short: no request id
        send(sock, struct.pack(">I", 0x80000006))
        return
    process = subprocess.Popen(["sh", "-c", command.decode()], stdin=fds[0], stdout=fds[1], stderr=fds[2],
                               start_new_session=True)
    for fd in fds:
        os.close(fd)
    with path.with_suffix(".pids").open("a") as pids:
        pids.write(f"{process.pid}\n")
    send(sock, struct.pack(">III", 0x80000006, rid, 7))
    status = process.wait()
    if status >= 0:
        send(sock, struct.pack(">III", 0x80000004, 7, status))


def main() -> None:
    path = Path(sys.argv[1])
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client, path), daemon=True).start()


if __name__ == "__main__":
    main()
