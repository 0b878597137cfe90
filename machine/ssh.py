"""One paramiko Transport per host, reused for every command and file transfer of a run.

Host keys are pinned in the machine's own known_hosts: the first key seen (or the one a driver wrote there
before boot) is the only one accepted afterwards.
"""

from __future__ import annotations

import logging
import select
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from machine.errors import MachineError

log = logging.getLogger("pymachine.ssh")

if TYPE_CHECKING:
    import paramiko


def _paramiko():
    # Imported on first use: `create` spawns the machine first and imports paramiko while it boots.
    import paramiko

    return paramiko


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int = 22
    user: str = "root"

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str


class HostKeyMismatch(MachineError):
    pass


class Connection:
    """An authenticated SSH session to one host."""

    def __init__(self, endpoint: Endpoint, key_path: Path, known_hosts: Path, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self._key = _paramiko().Ed25519Key.from_private_key_file(str(key_path))
        self._known_hosts = known_hosts
        self._timeout = timeout
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # -- connecting -------------------------------------------------------------------------------------
    def open(self) -> Connection:
        ep = self.endpoint
        sock = socket.create_connection((ep.host, ep.port), timeout=self._timeout)
        # Every command opens a channel; with Nagle's algorithm each open waits out the peer's delayed ACK
        # (~40 ms), which alone would make a no-op run of 40 tasks take 2 s instead of 0.2 s.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport = _paramiko().Transport(sock)
        pinned = self._pinned_key()
        if pinned is not None:
            # Ask only for the pinned key type so a server with several host keys cannot pick another.
            transport.get_security_options().key_types = [pinned.get_name()]
        try:
            transport.start_client(timeout=self._timeout)
            self._verify(transport.get_remote_server_key(), pinned)
            transport.auth_publickey(ep.user, self._key)
        except BaseException:
            transport.close()
            raise
        transport.set_keepalive(15)
        self._transport = transport
        return self

    def _pinned_key(self) -> paramiko.PKey | None:
        if not self._known_hosts.exists():
            return None
        keys = _paramiko().HostKeys(str(self._known_hosts)).lookup(self.endpoint.known_hosts_name)
        return next(iter(keys.values()), None) if keys else None

    def _verify(self, key: paramiko.PKey, pinned: paramiko.PKey | None) -> None:
        if pinned is None:
            with self._known_hosts.open("a") as f:
                f.write(f"{self.endpoint.known_hosts_name} {key.get_name()} {key.get_base64()}\n")
            self._known_hosts.chmod(0o600)
        elif key != pinned:
            raise HostKeyMismatch(
                f"host key of {self.endpoint.known_hosts_name} changed (got {key.fingerprint}, pinned "
                f"{pinned.fingerprint}); refusing to connect"
            )

    @classmethod
    def wait_ready(cls, endpoint: Endpoint, key_path: Path, known_hosts: Path, timeout: float = 120.0,
                   is_alive=None) -> Connection:
        """Connect, retrying with backoff while the host boots; `is_alive()` lets a dead host fail fast."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                return cls(endpoint, key_path, known_hosts, timeout=min(10.0, timeout)).open()
            except (HostKeyMismatch, _paramiko().AuthenticationException) as e:
                raise MachineError(f"ssh to {endpoint.host}:{endpoint.port}: {e}") from None
            except (EOFError, _paramiko().SSHException, OSError) as e:  # what a host says while it boots
                if time.monotonic() + delay > deadline or (is_alive is not None and not is_alive()):
                    raise MachineError(
                        f"ssh to {endpoint.host}:{endpoint.port} did not answer within {timeout:.0f}s: {e}"
                    ) from None
                log.debug("ssh not ready (%s); retrying in %.2fs", e, delay)
                time.sleep(delay)
                # A booting machine answers within a second or two: poll often, so no boot waits for a
                # long sleep to end; a refused connection costs almost nothing.
                delay = min(delay * 1.5, 0.25)

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        if self._transport is not None:
            self._transport.close()
        self._sftp = self._transport = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def transport(self) -> paramiko.Transport:
        if self._transport is None or not self._transport.is_active():
            raise MachineError(f"ssh connection to {self.endpoint.host} is closed")
        return self._transport

    # -- commands ---------------------------------------------------------------------------------------
    def run(self, command: str, *, stdin: bytes | None = None, check: bool = False,
            timeout: float | None = None, stream=None) -> Result:
        """Run `command` through the remote shell; `stream(kind, data)` sees output as it arrives."""
        log.debug("%s$ %s", self.endpoint.host, command)
        chan = self.transport.open_session()
        try:
            chan.exec_command(command)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                drained = _drain(chan.recv_ready, chan.recv, out, "stdout", stream)
                drained |= _drain(chan.recv_stderr_ready, chan.recv_stderr, err, "stderr", stream)
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if not drained:
                    if deadline is not None and time.monotonic() > deadline:
                        raise MachineError(f"{self.endpoint.host}: command timed out after {timeout}s: {command}")
                    if chan.eof_received:
                        # After EOF the channel stays readable; wait for the exit status instead of spinning.
                        chan.status_event.wait(0.5)
                    else:
                        select.select([chan], [], [], 0.5)
            result = Result(chan.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace"))
        finally:
            chan.close()
        log.debug("%s rc=%d", self.endpoint.host, result.rc)
        if check and result.rc != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise MachineError(
                f"{self.endpoint.host}: `{command}` exited {result.rc}" + (f": {detail[-1]}" if detail else "")
            )
        return result

    # -- files ------------------------------------------------------------------------------------------
    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self.transport.open_sftp_client()
        return self._sftp

    def put(self, local: Path, remote: str, recursive: bool = False) -> None:
        if local.is_dir():
            if not recursive:
                raise MachineError(f"{local} is a directory (use -r)")
            self._mkdir(remote, local.stat().st_mode)
            for child in sorted(local.iterdir()):
                self.put(child, str(PurePosixPath(remote) / child.name), recursive=True)
            return
        self.sftp.put(str(local), remote)
        self.sftp.chmod(remote, stat.S_IMODE(local.stat().st_mode))

    def get(self, remote: str, local: Path, recursive: bool = False) -> None:
        attrs = self.sftp.stat(remote)
        if stat.S_ISDIR(attrs.st_mode or 0):
            if not recursive:
                raise MachineError(f"{remote} is a directory (use -r)")
            local.mkdir(mode=stat.S_IMODE(attrs.st_mode or 0o755), exist_ok=True)
            for entry in sorted(self.sftp.listdir(remote)):
                self.get(str(PurePosixPath(remote) / entry), local / entry, recursive=True)
            return
        self.sftp.get(remote, str(local))
        local.chmod(stat.S_IMODE(attrs.st_mode or 0o644))

    def _mkdir(self, remote: str, mode: int) -> None:
        try:
            if stat.S_ISDIR(self.sftp.stat(remote).st_mode or 0):
                return
        except FileNotFoundError:
            pass
        self.sftp.mkdir(remote, stat.S_IMODE(mode))

    def remote_is_dir(self, remote: str) -> bool:
        try:
            return stat.S_ISDIR(self.sftp.stat(remote).st_mode or 0)
        except FileNotFoundError:
            return False


def _drain(ready, recv, buffer: bytearray, kind: str, stream) -> bool:
    """Move what a channel has buffered into `buffer` (and `stream`); True if there was anything."""
    got = False
    while ready():
        data = recv(65536)
        buffer += data
        got = True
        if stream:
            stream(kind, data)
    return got
