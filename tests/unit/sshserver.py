"""A real SSH server in the test's process (paramiko's server side), for the client's side of a login: host keys of
several types, public-key authentication, commands that succeed and print nothing. Listens on a loopback address
(IPv4 or IPv6)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from pathlib import Path

import paramiko


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return path


def fingerprint(key: paramiko.PKey) -> str:
    """As `ssh-keygen -l` prints it."""
    return key.fingerprint.rstrip("=")


class _Interface(paramiko.ServerInterface):
    def __init__(self, user_key: paramiko.PKey) -> None:
        self.user_key = user_key

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL if key == self.user_key else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        def finish() -> None:  # after the reply to the request, which paramiko sends once this returns
            with contextlib.suppress(EOFError, OSError):
                channel.send_exit_status(0)
                channel.shutdown_write()
                channel.close()

        threading.Timer(0.05, finish).start()
        return True


class Server:
    """Serves every connection to `host`:`port` with `host_keys` until close(); with `connections`, only that many
    (then the port refuses, as a host that went away)."""

    def __init__(self, host: str, host_keys: list[paramiko.PKey], user_key: paramiko.PKey,
                 connections: int | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family)
        self.listener.bind((host, 0))
        self.listener.listen()
        self.host, self.port = host, self.listener.getsockname()[1]
        self.host_keys, self.user_key = host_keys, user_key
        self.transports: list[paramiko.Transport] = []
        self.logins = 0  # connections accepted
        self._connections = connections
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                sock, _ = self.listener.accept()
                transport = paramiko.Transport(sock)
                for key in self.host_keys:
                    transport.add_server_key(key)
                self.transports.append(transport)
                self.logins += 1
                with contextlib.suppress(EOFError, OSError, paramiko.SSHException):
                    transport.start_server(server=_Interface(self.user_key))
                if self.logins == self._connections:
                    self.listener.close()

    def close(self) -> None:
        self.listener.close()
        for transport in self.transports:
            transport.close()
