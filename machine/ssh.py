"""An SSH connection to one host. `run(shell=…)` runs a command in a shell kept running (machine.sshshell)
instead of on a channel of its own; those shells run over OpenSSH's master connection kept between commands
(machine.sshmux) when there is one. Everything else, and a first contact, uses one paramiko Transport per host,
reused for every command and file transfer of a run (and, closed, kept a few seconds for the next connection of
the same login).

Host keys are pinned in the machine's own known_hosts: the first key seen (or the one a driver wrote there
before boot) is the only one accepted afterwards.

A transport that dies under a command or a transfer raises ConnectionLost; `reconnect()` opens the same
connection again (same pinned key), so a caller can re-run what was interrupted.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import hashlib
import logging
import os
import select
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from machine import muxclient, sshmux
from machine.endpoint import Endpoint
from machine.errors import MachineError
from machine.sshshell import ChannelStream, Shell, ShellTimeout, Stream, drain
from machine.store import write_atomic

log = logging.getLogger("pymachine.ssh")

if TYPE_CHECKING:
    import paramiko

# Keepalives every 15 s; a peer that acknowledges nothing for 30 s (a host that vanished without closing the
# connection) fails the socket instead of leaving a command waiting for TCP's ~15 min of retransmissions.
_KEEPALIVE = 15
_USER_TIMEOUT_MS = 30_000


class _QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges what it receives at once instead of up to 40 ms later.

    After the login, sshd sends a message the client does not answer (OpenSSH's host key announcement); with
    Nagle's algorithm on its side, its reply to the first channel open then waits for our delayed ACK of that
    message: 40 ms on every new connection, a quarter of a no-op provisioning run. Linux drops back to
    delayed ACKs on its own, so the switch is made again before every read."""

    @classmethod
    def connect_to(cls, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout=timeout)
        if not hasattr(socket, "TCP_QUICKACK"):  # Linux only; elsewhere the stall stays
            return sock
        quick = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        quick.settimeout(timeout)
        return quick

    def recv(self, size: int, flags: int = 0) -> bytes:
        self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return super().recv(size, flags)


# Run on a second channel after Ctrl-C: sshd starts every channel's command in a session of its own (setsid),
# so the interrupted command and all it started form one process group, led by a child of this connection's
# sshd process. Terminate every such group but this script's own. Work that must not die half-way (dpkg)
# runs in a session of its own (machine.roles.remote.detached) and is left to finish.
_STOP_OTHER_SESSIONS = r"""
f() { s=$(cat /proc/$1/stat 2>/dev/null) || return 1; set -- ${s##*) }; echo "$2 $4"; }
set -- $(f $$); own=$2
set -- $(f $own); sshd=$1
for d in /proc/[0-9]*; do
  p=${d#/proc/}; [ "$p" = "$own" ] && continue
  x=$(f $p) || continue; set -- $x
  [ "$1" = "$sshd" ] && kill -TERM -$p 2>/dev/null
done
true
"""


def _paramiko():
    # Imported on first use: `create` spawns the machine first and imports paramiko while it boots.
    if "paramiko" not in sys.modules and "invoke" not in sys.modules:
        # paramiko.config imports invoke when it is installed (and through it unittest.mock): ~60 ms of a
        # no-op provision, for ssh_config's `Match exec` alone, which pymachine never reads. Hidden while
        # paramiko loads (config then says so if it is ever asked to run one), importable again afterwards.
        sys.modules["invoke"] = None  # type: ignore[assignment]
        try:
            import paramiko
        finally:
            del sys.modules["invoke"]
    import paramiko

    if not _LOADED:
        # paramiko's transport thread logs a failed login with its traceback, which logging's last resort prints
        # on stderr: pymachine says what failed in one line of its own. --debug (a handler on the root logger)
        # still shows paramiko's log.
        logging.getLogger("paramiko").addHandler(logging.NullHandler())
        _LOADED.append(paramiko)
    return paramiko


# paramiko once _paramiko() returned it: sys.modules holds it half-initialized while another thread imports it.
_LOADED: list[Any] = []


def _transport_errors() -> tuple[type[BaseException], ...]:
    """What a failing connection raises; paramiko's own only once it is loaded (a run over a kept connection
    may never load it, and nothing else raises them)."""
    return (EOFError, OSError, _LOADED[0].SSHException) if _LOADED else (EOFError, OSError)


@dataclass(frozen=True)
class Result:
    rc: int
    stdout: str
    stderr: str


class HostKeyMismatch(MachineError):
    pass


# The host key types paramiko can check, as known_hosts names them, in paramiko's order of preference.
HOST_KEY_TYPES = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa")
# The host key algorithms that sign with a key of one type, by the type's name in known_hosts: an RSA key signs
# with SHA-2 (OpenSSH refuses SHA-1's `ssh-rsa` since 8.8, and paramiko no longer offers it).
_ALGORITHMS = {"ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256")}


def host_key_algorithms(key_type: str) -> list[str]:
    """What a client asks for to be shown the host's key of `key_type` (as known_hosts names it) and no other."""
    return list(_ALGORITHMS.get(key_type, (key_type,)))


def load_key(path: Path) -> paramiko.PKey:
    """A private key of any type paramiko knows (Ed25519, ECDSA, RSA), or one line saying why not."""
    path = Path(path)
    cert = path.with_name(path.name + "-cert.pub")  # loaded with the key, as paramiko and OpenSSH do
    try:
        data = path.read_bytes()
        certificate = cert.read_bytes() if cert.exists() else b""
    except OSError as e:
        raise MachineError(f"cannot read the ssh key {path}: {e.strerror or e}") from None
    # Cached by content: a run loads the user's key, then the machine's copy of it, and opens several connections.
    digest = hashlib.sha256(data + b"\0" + certificate).digest()
    if digest not in _KEYS:
        _KEYS[digest] = _parse_key(path, data)
    return _KEYS[digest]


_KEYS: dict[bytes, paramiko.PKey] = {}


def _parse_key(path: Path, data: bytes) -> paramiko.PKey:
    paramiko = _paramiko()
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        # OpenSSH's format first, then PEM, as paramiko does. RSA keys skip OpenSSL's consistency check (proving
        # p and q prime: ~0.3 s for 3072 bits, and paramiko's own loader runs it twice): this is the user's own
        # key, which only signs our logins, and OpenSSH does not check it either; a broken one is refused by
        # the server's signature check.
        try:
            loaded = serialization.load_ssh_private_key(data, None, unsafe_skip_rsa_key_validation=True)
        except ValueError:
            loaded = serialization.load_pem_private_key(data, None, unsafe_skip_rsa_key_validation=True)
        if isinstance(loaded, rsa.RSAPrivateKey):
            key = paramiko.RSAKey(key=loaded)
            cert = path.with_name(path.name + "-cert.pub")
            if cert.exists():
                key.load_certificate(str(cert))
            return key
        if not isinstance(loaded, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise MachineError(f"cannot read the ssh key {path}: it is neither an RSA, an ECDSA nor an Ed25519 key")
        return paramiko.PKey.from_path(path)
    except (paramiko.PasswordRequiredException, TypeError):  # TypeError: an encrypted key (no password given)
        raise MachineError(f"the ssh key {path} is encrypted: pymachine needs a key without a passphrase (make "
                           f"one with `ssh-keygen -t ed25519 -N ''`, or remove it with `ssh-keygen -p -f {path}`)"
                           ) from None
    except (OSError, ValueError, paramiko.SSHException, UnsupportedAlgorithm) as e:
        raise MachineError(f"cannot read the ssh key {path}: {e}") from None


# Transports close() keeps for the next open() of the same login (host, port, user, key, known_hosts): a
# `create` logs in three times in a row (the driver's checks, the wait for SSH, provisioning), and a login costs a
# key exchange, a signature and sshd's PAM session, several times what a command costs.
_PARK_SECONDS = 10.0
_PARK_PROBE_TIMEOUT = 5.0
_PARKED: dict[tuple[Any, ...], tuple[float, paramiko.Transport]] = {}
_PARKED_LOCK = threading.Lock()  # many machines at once (machine/fleet.py) park and take from one table


def _close_parked(which: Callable[[tuple[Any, ...], float], bool] = lambda login, since: True) -> None:
    with _PARKED_LOCK:
        closing = [(login, transport) for login, (since, transport) in _PARKED.items() if which(login, since)]
        for login, _ in closing:
            del _PARKED[login]
    for _, transport in closing:
        with contextlib.suppress(EOFError, OSError, _paramiko().SSHException):
            transport.close()


atexit.register(_close_parked)  # say goodbye to the hosts rather than drop the connections at exit


class ConnectionLost(MachineError):
    """The transport died under a command or a transfer; `Connection.reconnect()` may bring it back."""


class Connection:
    """An authenticated SSH session to one host."""

    def __init__(self, endpoint: Endpoint, key_path: Path, known_hosts: Path, timeout: float = 10.0,
                 is_alive: Callable[[], bool] | None = None) -> None:
        self.endpoint = endpoint
        self._known_hosts = known_hosts
        self._timeout = timeout
        self._is_alive = is_alive
        self._key_path = key_path
        self._transport: paramiko.Transport | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._shells: dict[str, Shell] = {}  # run(shell=…): the shells kept running, by launcher
        # The connection kept between commands (machine.sshmux) that runs the shells, when there is one.
        self._master: sshmux.Master | None = None
        self._opened = False

    @functools.cached_property
    def _key(self) -> paramiko.PKey:
        # Read at the first login: over a kept connection (machine.sshmux) a run needs neither it nor paramiko.
        return load_key(self._key_path)

    @property
    def _where(self) -> str:
        return self.endpoint.where

    # -- connecting -------------------------------------------------------------------------------------
    def open(self) -> Connection:
        """Connect: through the connection kept for this login (machine.sshmux), found running or started now,
        or else with paramiko. A first contact is paramiko's: it pins the host key. Over a kept connection,
        paramiko logs in only for what needs a connection of its own (file transfers, streamed output)."""
        self._master = self._kept_master()
        if self._master is not None and self._master.listening():
            log.debug("%s: a connection kept from an earlier command answers", self._where)
        elif (parked := self._parked()) is not None:  # this command's own, closed a moment ago: no new login
            self._transport, self._master = parked, None
        elif self._master is None or not self._master.connect():
            self._master = None
            self._transport = self._login_transport()
        self._opened = True
        return self

    def _kept_master(self) -> sshmux.Master | None:
        ssh = sshmux.client()
        if ssh is None or not self._known_hosts.exists() or not self._known_hosts.stat().st_size:
            return None  # no pinned host key yet
        return sshmux.Master(ssh, self.endpoint, self._key_path, self._known_hosts, self._timeout)

    def _login_transport(self, key_type: str | None = None) -> paramiko.Transport:
        """A new login. The host key algorithms asked for are only the pinned key's, so that a server with several
        host keys cannot show another; before any is pinned, `key_type`'s (paramiko's own list without it)."""
        ep = self.endpoint
        sock = _QuickAckSocket.connect_to(ep.host, ep.port, self._timeout)
        # Every command opens a channel; with Nagle's algorithm each open waits out the peer's delayed ACK
        # (~40 ms), which alone would make a no-op run of 40 tasks take 2 s instead of 0.2 s.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, _USER_TIMEOUT_MS)
        transport = _paramiko().Transport(sock)
        pinned = self._pinned_key()
        asked = pinned.get_name() if pinned is not None else key_type
        if asked:
            transport.get_security_options().key_types = host_key_algorithms(asked)
        try:
            transport.start_client(timeout=self._timeout)
            self._verify(transport.get_remote_server_key(), pinned)
            transport.auth_publickey(ep.user, self._key)
        except BaseException:
            transport.close()
            raise
        transport.set_keepalive(_KEEPALIVE)
        return transport

    def _pinned_key(self) -> paramiko.PKey | None:
        if not self._known_hosts.exists():
            return None
        try:
            keys = _paramiko().HostKeys(str(self._known_hosts)).lookup(self.endpoint.known_hosts_name)
        except (OSError, UnicodeDecodeError, _paramiko().SSHException, _paramiko().hostkeys.InvalidHostKey) as e:
            # Not worth retrying like a host that boots: the file will not mend itself.
            raise MachineError(f"cannot read the pinned host key in {self._known_hosts}: {e}") from None
        return next(iter(keys.values()), None) if keys else None

    def _verify(self, key: paramiko.PKey, pinned: paramiko.PKey | None) -> None:
        if pinned is None:
            self._pin(key)
        elif key != pinned:
            raise HostKeyMismatch(
                f"host key of {self.endpoint.known_hosts_name} changed (got {key.fingerprint}, pinned "
                f"{pinned.fingerprint}); refusing to connect"
            )

    def _pin(self, key: paramiko.PKey) -> None:
        """Add `key` to known_hosts, replacing the file whole: a crash never leaves half a line in it."""
        old = self._known_hosts.read_bytes() if self._known_hosts.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        line = f"{self.endpoint.known_hosts_name} {key.get_name()} {key.get_base64()}\n"
        write_atomic(self._known_hosts, old + line.encode(), 0o600)

    def _open_retrying(self, timeout: float, failure: str) -> Connection:
        """open(), retrying with backoff for `timeout` seconds while the host does not answer (yet)."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                return self.open()
            except (HostKeyMismatch, _paramiko().AuthenticationException) as e:
                raise MachineError(f"ssh to {self._where}: {e}") from None
            except (EOFError, _paramiko().SSHException, OSError) as e:  # what a host says while it boots
                if time.monotonic() + delay > deadline or (self._is_alive is not None and not self._is_alive()):
                    raise MachineError(f"{failure} {self._where} did not answer within {timeout:.0f}s: {e}") from None
                log.debug("ssh not ready (%s); retrying in %.2fs", e, delay)
                time.sleep(delay)
                # A booting machine answers within a second or two: poll often, so no boot waits for a
                # long sleep to end; a refused connection costs almost nothing.
                delay = min(delay * 1.5, 0.25)

    @classmethod
    def wait_ready(cls, endpoint: Endpoint, key_path: Path, known_hosts: Path, timeout: float = 120.0,
                   is_alive: Callable[[], bool] | None = None) -> Connection:
        """Connect, retrying with backoff while the host boots; `is_alive()` lets a dead host fail fast."""
        conn = cls(endpoint, key_path, known_hosts, timeout=min(10.0, timeout), is_alive=is_alive)
        return conn._open_retrying(timeout, "ssh to")

    def reconnect(self, timeout: float = 60.0) -> None:
        """Open the connection again after ConnectionLost; MachineError if the host stays away `timeout` s."""
        self._close(park=False)
        log.warning("%s: the ssh connection was lost; reconnecting (up to %.0fs)", self._where, timeout)
        self._open_retrying(timeout, "lost the ssh connection:")

    def close(self) -> None:
        self._close(park=True)

    def _close(self, park: bool) -> None:
        # On a dead transport, closing its channels and socket can only fail the same way again.
        self._close_shells()
        with contextlib.suppress(*_transport_errors()):
            if self._sftp is not None:
                self._sftp.close()
            if self._transport is not None and not (park and self._park(self._transport)):
                self._transport.close()
        self._sftp = self._transport = None
        self._opened = False

    # -- reuse: a closed connection stays open a few seconds for the next open() of the same login ----------
    @property
    def _login(self) -> tuple[Any, ...]:
        return (self.endpoint.host, self.endpoint.port, self.endpoint.user, self._key.get_fingerprint(),
                str(self._known_hosts))

    def _park(self, transport: paramiko.Transport) -> bool:
        """Keep a live transport for _parked(); False if it is not worth keeping (then the caller closes it)."""
        if not transport.is_active():
            return False
        _close_parked(lambda login, since: login == self._login or time.monotonic() - since > _PARK_SECONDS)
        with _PARKED_LOCK:
            _PARKED[self._login] = (time.monotonic(), transport)
        return True

    def _parked(self) -> paramiko.Transport | None:
        """The transport close() parked for this login, if it is still fresh, still pinned and still answers."""
        if not _PARKED:  # nothing parked: no need to read the key (and load paramiko) for the login's name
            return None
        with _PARKED_LOCK:
            since, transport = _PARKED.pop(self._login, (0.0, None))
        if transport is None:
            return None
        try:
            pinned = self._pinned_key()
            if (time.monotonic() - since <= _PARK_SECONDS and pinned is not None and transport.is_active()
                    and transport.get_remote_server_key() == pinned):
                # A host that vanished without closing the connection (a killed VM) must not pass for one that
                # answers, as a new connection would not: a channel has to open within a few seconds.
                transport.open_session(timeout=_PARK_PROBE_TIMEOUT).close()
                log.debug("%s: reusing the connection closed a moment ago", self._where)
                return transport
        except (EOFError, OSError, _paramiko().SSHException):
            pass
        with contextlib.suppress(EOFError, OSError, _paramiko().SSHException):
            transport.close()
        return None

    def _close_shells(self) -> None:
        for shell in self._shells.values():
            with contextlib.suppress(*_transport_errors()):
                shell.close()
        self._shells.clear()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def transport(self) -> paramiko.Transport:
        if self._transport is None:
            if not self._opened:
                raise MachineError(f"ssh connection to {self._where} is closed")
            try:  # open() found a kept connection: this login is for a transfer or a command of its own
                self._transport = self._parked() or self._login_transport()
            except (EOFError, _paramiko().SSHException, OSError) as e:
                raise self._lost(e) from None
        if not self._transport.is_active():
            raise self._lost(self._transport.get_exception())
        return self._transport

    def _lost(self, cause: BaseException | str | None) -> ConnectionLost:
        reason = "closed by the host" if not cause else str(cause) or type(cause).__name__
        return ConnectionLost(f"lost the ssh connection to {self._where} ({reason})")

    def _alive(self) -> bool:
        return self._transport is not None and self._transport.is_active()

    # -- commands ---------------------------------------------------------------------------------------
    def run(self, command: str, *, stdin: bytes | None = None, check: bool = False,
            timeout: float | None = None, stream=None, shell: str | None = None) -> Result:
        """Run `command` through the remote shell; `stream(kind, data)` sees output as it arrives.

        With `shell` (a launcher such as `sudo -n -H -u root -- sh`), the command runs in the shell that launcher
        started, kept running for the commands after it (machine.sshshell): no channel and no sudo of its own.
        Ctrl-C terminates the command on the host (its process group) before it is re-raised."""
        log.debug("%s$ %s", self.endpoint.host, command)
        try:
            result = self._exec_in(shell, command, stdin, timeout) if shell else self._exec(command, stdin, timeout,
                                                                                             stream)
        except KeyboardInterrupt:
            self._stop_remote()
            self._close_shells()
            raise
        log.debug("%s rc=%d", self.endpoint.host, result.rc)
        if check and result.rc != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise MachineError(
                f"{self.endpoint.host}: `{command}` exited {result.rc}" + (f": {detail[-1]}" if detail else "")
            )
        return result

    def _exec(self, command: str, stdin: bytes | None, timeout: float | None, stream) -> Result:
        """One command on a channel of its own; ConnectionLost if the transport dies before it ends."""
        try:
            chan = self.transport.open_session()
        except (EOFError, _paramiko().SSHException, OSError) as e:
            raise self._lost(e) from None
        try:
            try:
                out, err = self._converse(chan, command, stdin, timeout, stream)
            except (EOFError, _paramiko().SSHException, OSError) as e:
                raise self._lost(e) from None
            # Without an exit status, the channel ended with the transport under it (a command killed by a
            # signal also has none, but its channel saw EOF on a live transport).
            if chan.exit_status == -1 and not (chan.eof_received and self._alive()):
                raise self._lost(self._transport.get_exception() if self._transport else None)
            return Result(chan.exit_status, out.decode(errors="replace"), err.decode(errors="replace"))
        finally:
            chan.close()

    def _exec_in(self, launcher: str, command: str, stdin: bytes | None, timeout: float | None) -> Result:
        """One command in the shell `launcher` started (started now if none runs); as _exec otherwise."""
        shell = self._shells.get(launcher)
        try:
            if shell is None:
                log.debug("%s: starting the shell `%s`", self.endpoint.host, launcher)
                shell = self._shells[launcher] = Shell(self._start_shell(launcher))
            reply = shell.run(command, stdin, timeout)
        except _transport_errors() as e:
            if (lost := self._shells.pop(launcher, None)) is not None:
                lost.close()  # its process and pipes now, not when collected
            raise self._lost(e) from None
        except ShellTimeout:
            self._shells.pop(launcher).close()  # still busy with the command: a later one gets a new shell
            raise MachineError(f"{self.endpoint.host}: command timed out after {timeout}s: {command}") from None
        if reply.ended:
            # The launcher failed (sudo refused) or the shell was killed: report it as this command's result,
            # as a command on a channel of its own would have failed; the next command starts a new shell.
            self._shells.pop(launcher).close()
            if shell.stream.lost():
                raise self._lost(shell.stream.lost_reason(reply.stderr))
        return Result(reply.rc, reply.stdout.decode(errors="replace"), reply.stderr.decode(errors="replace"))

    def _start_shell(self, launcher: str) -> Stream:
        """The stream of a new shell: a session of the kept connection, or a channel of this command's own login
        when there is none or the host refuses it another session (sshd's MaxSessions, counting the user's own
        `pymachine ssh` sessions on it)."""
        if self._master is not None:
            try:
                return self._master.start(launcher)
            except muxclient.Refused as e:
                log.debug("%s: the kept connection gets no session (%s): logging in", self.endpoint.host, e)
        return ChannelStream(self.transport.open_session(), launcher)

    def _converse(self, chan, command: str, stdin: bytes | None, timeout: float | None,
                  stream) -> tuple[bytearray, bytearray]:
        chan.exec_command(command)
        if stdin is not None:
            chan.sendall(stdin)
        chan.shutdown_write()
        out, err = bytearray(), bytearray()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            drained = drain(chan.recv_ready, chan.recv, out, "stdout", stream)
            drained |= drain(chan.recv_stderr_ready, chan.recv_stderr, err, "stderr", stream)
            if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                return out, err
            if not drained:
                if deadline is not None and time.monotonic() > deadline:
                    raise MachineError(f"{self.endpoint.host}: command timed out after {timeout}s: {command}")
                if chan.eof_received:
                    # After EOF the channel stays readable; wait for the exit status instead of spinning.
                    chan.status_event.wait(0.5)
                else:
                    select.select([chan], [], [], 0.5)

    def _stop_remote(self) -> None:
        """After Ctrl-C: end what the interrupted command started on the host, if the host can be told."""
        groups = [shell.stream.group for shell in self._shells.values() if shell.stream.group]
        if groups and self._master is not None:  # the kept connection's sessions may be other commands' too
            self._master.signal_groups(groups)
        if not self._alive():
            return
        with contextlib.suppress(MachineError):
            self._exec(_STOP_OTHER_SESSIONS, None, 5.0, None)

    # -- files ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _file_errors(self, remote: str) -> Iterator[None]:
        """SFTP and local file errors as one-line MachineErrors naming the path; ConnectionLost if the
        transport died under the transfer."""
        try:
            yield
        except MachineError:
            raise
        except (EOFError, OSError, _paramiko().SSHException, _paramiko().SFTPError) as e:
            if not self._alive():
                raise self._lost(e) from None
            raise MachineError(_file_error(self.endpoint.name or self.endpoint.host, remote, e)) from None

    @property
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self.transport.open_sftp_client()
        return self._sftp

    def put(self, local: Path, remote: str, recursive: bool = False, delta: bool = False) -> None:
        """Copy a file (a directory with `recursive`) to the machine; with `delta`, only files that differ."""
        with self._file_errors(remote):
            info = local.stat()
            if stat.S_ISDIR(info.st_mode):
                if not recursive:
                    raise MachineError(f"{local} is a directory (use -r)")
                self._mkdir(remote, info.st_mode)
                for child in sorted(local.iterdir()):
                    self.put(child, str(PurePosixPath(remote) / child.name), recursive=True, delta=delta)
                return
            if delta and _same_file(self._stat(remote), info):
                return
            self.sftp.put(str(local), remote)
            self.sftp.chmod(remote, stat.S_IMODE(info.st_mode))
            if delta:  # the next delta copy tells an unchanged file by its time
                self.sftp.utime(remote, (info.st_atime, info.st_mtime))

    def get(self, remote: str, local: Path, recursive: bool = False, delta: bool = False) -> None:
        """Copy a file (a directory with `recursive`) from the machine; with `delta`, only files that differ."""
        with self._file_errors(remote):
            attrs = self.sftp.stat(remote)
            if stat.S_ISDIR(attrs.st_mode or 0):
                if not recursive:
                    raise MachineError(f"{remote} is a directory (use -r)")
                local.mkdir(mode=_plain_mode(attrs.st_mode, 0o755), exist_ok=True)
                for entry in sorted(self.sftp.listdir(remote)):
                    if entry in (".", "..") or "/" in entry:  # names come from the machine: never outside `local`
                        raise MachineError(f"{remote}: the machine listed an entry named {entry!r}; refusing it")
                    self.get(str(PurePosixPath(remote) / entry), local / entry, recursive=True, delta=delta)
                return
            if delta and local.exists() and _same_file(attrs, local.stat()):
                return
            self.sftp.get(remote, str(local))
            local.chmod(_plain_mode(attrs.st_mode, 0o644))
            if delta:
                os.utime(local, (attrs.st_atime or 0, attrs.st_mtime or 0))

    def _stat(self, remote: str) -> paramiko.SFTPAttributes | None:
        try:
            return self.sftp.stat(remote)
        except FileNotFoundError:
            return None

    def _mkdir(self, remote: str, mode: int) -> None:
        try:
            if stat.S_ISDIR(self.sftp.stat(remote).st_mode or 0):
                return
        except FileNotFoundError:
            pass
        self.sftp.mkdir(remote, stat.S_IMODE(mode))

    def remote_is_dir(self, remote: str) -> bool:
        with self._file_errors(remote):
            try:
                return stat.S_ISDIR(self.sftp.stat(remote).st_mode or 0)
            except FileNotFoundError:
                return False


def _file_error(host: str, remote: str, e: BaseException) -> str:
    """`path: reason` for a local file; `host:path: reason` for the remote side (SFTP's errors name no file)."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {(e.strerror or str(e)).lower()}"
    code = getattr(e, "errno", None)
    if code in (errno.ENOENT, errno.EACCES):
        reason = os.strerror(code).lower()
    else:
        reason = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
    return f"{host}:{remote}: {reason}"


def _same_file(remote: paramiko.SFTPAttributes | None, local: os.stat_result) -> bool:
    """rsync's quick check: both regular files, of the same size, modification time (SFTP's are whole seconds)
    and permissions."""
    return (remote is not None and stat.S_ISREG(remote.st_mode or 0) and stat.S_ISREG(local.st_mode)
            and remote.st_size == local.st_size and remote.st_mtime == int(local.st_mtime)
            and _plain_mode(remote.st_mode, 0) == _plain_mode(local.st_mode, 0))


def _plain_mode(mode: int | None, default: int) -> int:
    """Permission bits only: a file copied from a machine is never setuid or setgid here (pymachine runs as root)."""
    return stat.S_IMODE(mode or default) & 0o777
