"""The SSH client's socket acknowledges what it reads at once (machine.ssh._QuickAckSocket).

sshd writes with Nagle's algorithm on: a message that follows one the client has not acknowledged yet waits for
that ACK, which Linux delays up to 40 ms once a connection goes back and forth. The exchange below provokes
exactly that, on real sockets in a network namespace of its own, and reads the kernel's count of delayed ACKs
there (no other traffic adds to it): a plain socket delays, the client's socket does not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXCHANGE = r"""
import socket
from machine.ssh import _QuickAckSocket

def delayed_acks():
    head, values = [line.split() for line in open("/proc/net/netstat").read().splitlines()[:2]]
    return int(values[head.index("DelayedACKs")])

def exchange(connect):
    server = socket.create_server(("127.0.0.1", 0))
    client = connect(server.getsockname()[1])
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as machine.ssh's
    peer, _ = server.accept()  # Nagle on, as sshd's
    before = delayed_acks()
    for _ in range(10):  # request and reply: both ends leave the quick ACKs of a new connection
        client.sendall(b"?")
        peer.recv(1)
        peer.sendall(b"a")
        peer.sendall(b"b")  # held back until the client acknowledges "a"
        got = b""
        while len(got) < 2:
            got += client.recv(2)
    return delayed_acks() - before

print(exchange(lambda port: socket.create_connection(("127.0.0.1", port), 5)),
      exchange(lambda port: _QuickAckSocket.connect_to("127.0.0.1", port, 5)))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a network namespace needs root")
def test_the_client_socket_never_delays_its_acks():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1"', sys.executable,
                          EXCHANGE], capture_output=True, text=True, cwd=root, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plain, quick = map(int, proc.stdout.split())
    assert plain > 0  # the exchange does provoke delayed ACKs
    assert quick == 0
