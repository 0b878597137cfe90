"""machine.ssh without a server: what reconnecting says when the host stays away, and pinning a host key.

Real sockets on 127.0.0.1 (a port nothing listens on refuses at once). Losing a live connection, and getting
it back, is tested against a real machine's sshd in tests/integration/test_provision_faults.py."""

from __future__ import annotations

import socket
from pathlib import Path

import paramiko
import pytest

from machine.errors import MachineError
from machine.ssh import Connection, ConnectionLost, Endpoint
from machine.sshkeys import new_keypair


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "id_ed25519"
    path.write_bytes(new_keypair().private_openssh)
    return path


def test_reconnect_to_a_host_that_stays_away_names_it_and_the_wait(key, tmp_path):
    port = free_port()
    conn = Connection(Endpoint("127.0.0.1", port), key, tmp_path / "known_hosts", timeout=1)
    with pytest.raises(MachineError) as e:
        conn.reconnect(timeout=1)
    assert not isinstance(e.value, ConnectionLost)
    assert f"127.0.0.1:{port} did not answer within 1s" in str(e.value)
    assert "\n" not in str(e.value)


def test_reconnect_gives_up_at_once_on_a_machine_that_is_gone(key, tmp_path):
    port = free_port()
    conn = Connection(Endpoint("127.0.0.1", port), key, tmp_path / "known_hosts", is_alive=lambda: False)
    with pytest.raises(MachineError, match=f"127.0.0.1:{port} did not answer within 600s"):
        conn.reconnect(timeout=600)  # would wait ten minutes if is_alive() were not asked


def test_a_connection_never_opened_is_closed_not_lost(key, tmp_path):
    conn = Connection(Endpoint("127.0.0.1", free_port()), key, tmp_path / "known_hosts")
    with pytest.raises(MachineError, match="is closed") as e:
        conn.run("true")
    assert not isinstance(e.value, ConnectionLost)


def test_the_first_host_key_is_pinned_by_replacing_known_hosts(key, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("[10.0.0.9]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherOtherOtherOtherOtherOtherOther")
    before = known_hosts.stat().st_ino
    conn = Connection(Endpoint("10.0.0.8"), key, known_hosts)
    host_key = paramiko.Ed25519Key.from_private_key_file(str(key))
    conn._verify(host_key, None)
    lines = known_hosts.read_text().splitlines()
    assert lines[0].startswith("[10.0.0.9]:2222 ")  # what was there stays, completed to a whole line
    assert lines[1] == f"10.0.0.8 ssh-ed25519 {host_key.get_base64()}"
    assert known_hosts.stat().st_ino != before  # a new file renamed over the old one, not appended in place
    assert known_hosts.stat().st_mode & 0o777 == 0o600
    assert conn._pinned_key() == host_key
