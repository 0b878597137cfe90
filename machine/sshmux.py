"""SSH connections kept between commands: OpenSSH's own multiplexing (ControlMaster, ControlPersist).

A login costs the machine ~25 ms of CPU (sshd's re-exec, its privilege-separated children, the key exchange;
measured: a no-op run's ~82 ms became ~59) and the client several round trips and paramiko's import; a session
on a connection already open costs none of it. So the shells provisioning keeps
running (machine.sshshell) run as sessions of one OpenSSH master connection per machine, asked for over its
control socket (machine.muxclient), and the master stays `PYMACHINE_SSH_PERSIST` seconds (600 by default) after
its last session ends.
The next command then logs in no more. `pymachine ssh` shares the same master. File transfers and the commands
that stream their output keep paramiko's connection (machine.ssh), opened only when one is needed.

The control sockets live in a directory of the user's own under the temporary directory (a socket's path is
limited to ~100 bytes, too short for a store's path). A socket's name is a digest of everything that makes the
login: machine, address, port, user, key file and pinned host keys. A machine recreated under the same name, or at a
new address, never reaches the previous one's master. `rm`, `stop`, `kill` and `restart` end a machine's masters,
and any of its ssh processes still logging in (`forget`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

from machine import muxclient
from machine.endpoint import Endpoint
from machine.errors import MachineError

log = logging.getLogger("pymachine.ssh")

PERSIST_ENV = "PYMACHINE_SSH_PERSIST"
# Ten minutes, not Ansible's 60 s: starting a master costs ~40 ms more than paramiko's login (OpenSSH leaves
# Nagle's algorithm on, and the key exchange waits out a delayed ACK), so a user's commands minutes apart
# should find one running.
_DEFAULT_PERSIST = 600
_CONTROL_TIMEOUT = 5.0  # a request to a master only talks to the local process


def persist_seconds() -> int:
    """How long a master outlives its last session; 0: no kept connections (each command logs in)."""
    raw = os.environ.get(PERSIST_ENV, "").strip()
    if not raw:
        return _DEFAULT_PERSIST
    if not re.fullmatch(r"[0-9]{1,9}", raw):  # what ssh's ControlPersist takes
        raise MachineError(f"{PERSIST_ENV}={raw!r}: expected a number of seconds (0 turns kept connections off)")
    return int(raw)


def client() -> str | None:
    """The OpenSSH client, when connections are to be kept, it is installed and there is a safe place for them."""
    if not persist_seconds():
        return None
    ssh = shutil.which("ssh")
    return ssh if ssh and _control_dir() else None


def _control_dir() -> Path | None:
    """The user's own directory for the masters' sockets; None (and a warning) if it is not safe to use."""
    try:
        path = Path(tempfile.gettempdir()).resolve() / f"pymachine-{os.getuid()}"
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
        info = path.lstat()
        parents = [(parent, parent.stat()) for parent in path.parents]
    except OSError as e:
        return _unsafe(str(e))
    # Whoever serves a socket there sees what a command sends (a `pymachine ssh` gets the terminal): the
    # directory must be ours, and no one else may rename or replace it (OpenSSH's own rule for its files).
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        return _unsafe(f"{path} is not a directory only user {os.getuid()} can open")
    for parent, parent_info in parents:
        writable = parent_info.st_mode & 0o022 and not parent_info.st_mode & stat.S_ISVTX
        if parent_info.st_uid not in (0, os.getuid()) or writable:
            return _unsafe(f"{parent} can be changed by another user")
    # A socket's path has at most 107 bytes, and ssh first binds the name with 17 more.
    if len(os.fsencode(path)) + 1 + _NAME_LENGTH + 17 > 107:
        return _unsafe(f"{path} is too long for a socket's path (set TMPDIR to a shorter directory)")
    return path


_NAME_LENGTH = 33  # of a master's socket: two digests of 16, and a dash
# OpenSSH's own default order without the post-quantum and SHA-1 exchanges, every name known since OpenSSH 7.4.
_KEX = ("curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,ecdh-sha2-nistp384,ecdh-sha2-nistp521,"
        "diffie-hellman-group-exchange-sha256,diffie-hellman-group16-sha512,diffie-hellman-group18-sha512,"
        "diffie-hellman-group14-sha256")


@functools.cache  # once per command, not once per machine of a fleet
def _unsafe(reason: str) -> None:
    log.warning("SSH connections are not kept between commands: %s", reason)


def _digest(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


def machine_prefix(known_hosts: Path) -> str:
    """The start of the names of every master of one machine (its known_hosts file is its own)."""
    return _digest(known_hosts.resolve())[:16]


class Master:
    """The kept connection to one machine: the arguments that reach it, and its control commands."""

    def __init__(self, ssh: str, endpoint: Endpoint, key_path: Path, known_hosts: Path, timeout: float) -> None:
        # Absolute: ssh runs in / (a master outlives us, and must keep no directory of ours busy).
        key_path, known_hosts = key_path.resolve(), known_hosts.resolve()
        pinned = known_hosts.read_bytes() if known_hosts.exists() else b""
        login = _digest(endpoint.host, endpoint.port, endpoint.user, key_path, pinned)[:16]
        directory = _control_dir() if persist_seconds() else None
        # The master's socket; None: this login keeps no connection (`argv` then logs in every time).
        self.path = directory / f"{machine_prefix(known_hosts)}-{login}" if directory else None
        self.endpoint = endpoint
        self._timeout = timeout
        self._argv = [
            ssh, "-F", "none", "-o", f"IdentityFile={_path(key_path)}", "-p", str(endpoint.port),
            "-l", endpoint.user, "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={_path(known_hosts)}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", f"HostKeyAlias={endpoint.known_hosts_name}",
            # The pins are pymachine's: ssh adds no address line to them (that would also rename the master).
            "-o", "CheckHostIP=no", "-o", "UpdateHostKeys=no",
            "-o", f"ConnectTimeout={max(1, round(timeout))}", "-o", "LogLevel=ERROR",
            # First the key exchange paramiko makes: OpenSSH's default (post-quantum sntrup761) cost ~80 ms of
            # the client's CPU per login here, against ~10. A whole list, not `^curve25519-sha256`: clients
            # before OpenSSH 8 refuse that syntax (and would lose kept connections and `pymachine ssh`).
            "-o", f"KexAlgorithms={_KEX}",
            # As paramiko's keepalives: a host that vanished without closing the connection ends the master.
            "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
        ]
        if self.path:
            self._argv += ["-o", "ControlMaster=auto", "-o", f"ControlPath={_path(self.path)}",
                           "-o", f"ControlPersist={persist_seconds()}"]

    def options(self) -> list[str]:
        """ssh and its options without a host: for programs that run ssh themselves (sshfs)."""
        return list(self._argv)

    def argv(self, *command: str, terminal: bool | None = False) -> list[str]:
        """The ssh command line that runs `command` (an interactive login when empty) over the master; with
        `terminal=None`, ssh decides (a terminal for a login from a terminal), as a user's own ssh would."""
        tty = {True: ["-t"], False: ["-T"], None: []}[terminal]
        return [*self._argv, *tty, self.endpoint.host, *(["--", *command] if command else [])]

    def listening(self) -> bool:
        """True if a master for this login listens (then a session costs no login)."""
        if self.path is None:
            return False
        with socket.socket(socket.AF_UNIX) as probe:
            probe.settimeout(_CONTROL_TIMEOUT)
            try:
                probe.connect(str(self.path))  # a dead master's socket refuses; ssh itself would replace it
            except OSError:
                return False
        return True

    def connect(self) -> bool:
        """Log in and leave the master running; False (with ssh's reason logged) if that failed: the caller then
        logs in with paramiko, which says precisely why (a changed host key, a refused key) or retries."""
        # `-f`: back as soon as the login is made (~90 ms here, against ~150 for waiting on a first session).
        # A command (`true`), not `-N`: an ssh that lost the race to be the master (another pymachine started
        # one meanwhile) then ends after it instead of staying in the background with nothing to do.
        argv = [*self._argv, "-f", "-T", self.endpoint.host, "--", "true"]
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=self._timeout + _CONTROL_TIMEOUT, cwd="/")
        except (OSError, subprocess.TimeoutExpired) as e:
            log.debug("%s: no kept connection: %s", self.endpoint.host, e)
            return False
        if proc.returncode != 0:
            log.debug("%s: no kept connection: %s", self.endpoint.host, proc.stderr.strip())
        return proc.returncode == 0

    def answers(self) -> bool:
        """True if the master answers a request (a master that lost its connection may still listen a moment)."""
        return self.path is not None and muxclient.alive(self.path, _CONTROL_TIMEOUT)

    def start(self, command: str) -> muxclient.Session:
        """`command` running on the machine over the master, its stdin, stdout and stderr ours (machine.sshshell's
        stream); OSError if the master is gone or refuses."""
        assert self.path is not None, "start() needs a kept connection"
        # `echo $$` first: the remote session's process group, for Ctrl-C (in `sh`: the login shell may be any,
        # fish has no `$$`).
        remote = f"exec sh -c {shlex.quote(f'echo $$; exec {command}')}"
        return muxclient.Session(self.path, remote, self._timeout, self.answers)

    def signal_groups(self, groups: list[int]) -> None:
        """Terminate these process groups on the machine (the kept shells' sessions, after Ctrl-C)."""
        # Not `kill -TERM -- -G`: dash's kill takes no `--` (and without it, a group after the signal is fine).
        if not self.listening():
            return  # the master is gone: a login now would start another
        kill = "kill -TERM " + " ".join(f"-{group}" for group in groups) + " 2>/dev/null; true"
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(self.argv(kill), stdin=subprocess.DEVNULL, capture_output=True, timeout=_CONTROL_TIMEOUT)


def _path(path: Path) -> str:
    """`path` as the value of an ssh option: quoted (a known_hosts option takes a list), `%` not a token."""
    if '"' in str(path):
        raise MachineError(f"{path}: ssh cannot be given a path with a double quote")
    return '"' + str(path).replace("%", "%%") + '"'


def forget(known_hosts: Path) -> None:
    """End every master of the machine whose known_hosts file this is (it was removed, stopped or restarted)."""
    directory = _control_dir()
    try:
        sockets = [p for p in directory.glob(f"{machine_prefix(known_hosts)}-*") if p.is_socket()] if directory else []
    except OSError:
        return
    for path in sockets:
        muxclient.terminate(path, _CONTROL_TIMEOUT)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a master that died without removing it
    if directory:
        _end_logins(_path(directory / machine_prefix(known_hosts)).rstrip('"') + "-")


def _end_logins(control_path: str) -> None:
    """Terminate this user's ssh processes whose ControlPath starts with `control_path`: a master still logging
    in has no socket to be asked on yet, and once in (the command that started it killed meanwhile) it would keep
    its connection for PERSIST seconds."""
    wanted = f"ControlPath={control_path}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or proc.stat().st_uid != os.getuid():
                continue
            if any(arg.startswith(wanted) for arg in (proc / "cmdline").read_bytes().split(b"\0")):
                os.kill(int(proc.name), signal.SIGTERM)
        except OSError:  # ended meanwhile (ProcessLookupError too), or not ours to read
            continue
