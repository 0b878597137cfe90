"""generic: adopt a server that already exists and answers SSH (docker-machine's `--driver generic`).

pymachine makes nothing here: it copies the user's private key into the machine's directory, pins the host key
the server shows on the first connection (or only the one given with --generic-host-key-fingerprint), and checks
that the user may become root (passwordless sudo) before provisioning starts. `rm` forgets the host; `rm
--uninstall` first removes what provisioning installed. The host's power is not pymachine's: stop, start and
kill refuse, restart reboots it over SSH.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from machine.become import as_user, check_root
from machine.drivers.base import Driver, Option, State
from machine.endpoint import host_port, is_host, is_ip, normal_host
from machine.errors import MachineError, UsageError
from machine.names import validate_user
from machine.ssh import HOST_KEY_TYPES, Connection, Endpoint, load_key
from machine.store import Machine, RecordDamaged, write_atomic

# The private keys OpenSSH tries by default, in its order: without --generic-ssh-key, the first that exists.
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
KEY_FILE = "ssh_key"  # the copy of the user's key in the machine's directory
CONNECT_TIMEOUT = 10.0
STATE_TIMEOUT = 1.0
REBOOT_TIMEOUT = 300.0
# Which boot this is: the kernel's boot id, and when PID 1 started (a container's reboot keeps the kernel's).
_BOOT = "echo $(cat /proc/sys/kernel/random/boot_id) $(cut -d' ' -f22 /proc/1/stat)"
_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}=?")


def default_key(home: Path | None = None) -> Path | None:
    """~/.ssh/id_ed25519, id_ecdsa or id_rsa: the first that exists (what `ssh` itself would offer first)."""
    ssh_dir = (home or Path.home()) / ".ssh"
    return next((ssh_dir / name for name in DEFAULT_KEYS if (ssh_dir / name).is_file()), None)


def key_path(options: dict[str, Any]) -> Path:
    """The user's private key: --generic-ssh-key, or the first default key; UsageError when there is none."""
    given = options.get("generic_ssh_key")
    if given:
        path = Path(os.path.expanduser(given))
        if not path.is_file():
            raise UsageError(f"--generic-ssh-key: {given}: no such file")
        return path
    found = default_key()
    if found is None:
        raise UsageError(f"--generic-ssh-key: none given and none of ~/.ssh/{{{','.join(DEFAULT_KEYS)}}} exists")
    return found


def host_address(value: Any) -> str:
    """--generic-ip-address as recorded: an IP address in its canonical form (the one certificates and known_hosts
    give back, so `2001:DB8::5` and `2001:db8::5` are one host), a host name as given."""
    return normal_host(str(value).strip())


def normalize_fingerprint(value: str) -> str:
    """`SHA256:<base64>` as `ssh-keygen -l` prints it (the trailing `=` paramiko adds is dropped)."""
    text = value.strip()
    if not _FINGERPRINT.fullmatch(text):
        raise UsageError(f"--generic-host-key-fingerprint: {value!r} is not a SHA256 fingerprint "
                         f"(SHA256:… as `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` prints it)")
    return text.rstrip("=")


def fingerprint_matches(actual: str, expected: str) -> bool:
    """Whether a key's fingerprint (paramiko's `SHA256:…=`, or ssh-keygen's without `=`) is the expected one."""
    return actual.strip().rstrip("=") == normalize_fingerprint(expected)


class _NotExpected(MachineError):
    """The host showed a key other than --generic-host-key-fingerprint's."""

    def __init__(self, key) -> None:
        super().__init__(key.fingerprint)
        self.key = key


class _Adopting(Connection):
    """The first connection: shows the host key it pins, and pins only the expected one when there is one."""

    def __init__(self, *args: Any, expected: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._expected = expected

    seen = None  # the host key shown, pinned by `pin()` once the adoption is known to work

    def _login_transport(self, key_type: str | None = None):
        """A server shows one host key per login: the first of its types the client asks for (Ed25519, to
        paramiko). When that is not the expected one, log in again asking for each other type until it is."""
        if not self._expected:
            return super()._login_transport(key_type)
        shown: dict[str, str] = {}  # fingerprints of the keys the host showed, by type
        for kind in (None, *HOST_KEY_TYPES):
            if kind in shown:
                continue
            try:
                return super()._login_transport(kind)
            except _NotExpected as e:
                shown[e.key.get_name()] = e.key.fingerprint.rstrip("=")
            except _no_such_key():  # the host has no key of this type (of any paramiko checks, on the first login)
                if kind is None:
                    raise
        keys = ", ".join(shown.values())
        raise MachineError(f"host key{'s' if len(shown) > 1 else ''} of {self.endpoint.known_hosts_name} "
                           f"{'are' if len(shown) > 1 else 'is'} {keys}, not {self._expected} "
                           f"(--generic-host-key-fingerprint); refusing to connect")

    def _verify(self, key, pinned) -> None:
        if pinned is None:
            if self._expected and not fingerprint_matches(key.fingerprint, self._expected):
                raise _NotExpected(key)
            self.seen = key
            return
        super()._verify(key, pinned)

    def pin(self) -> None:
        """Show the host key, then pin it: the only one accepted from now on."""
        if self.seen is not None:
            print(f"pymachine: pinned host key of {self.endpoint.known_hosts_name}: "
                  f"{self.seen.fingerprint.rstrip('=')}", file=sys.stderr, flush=True)
            self._pin(self.seen)


class GenericDriver(Driver):
    name = "generic"
    makes_key: ClassVar[bool] = False
    options = (
        Option("generic-ip-address", "Address (IP or DNS name) of the server to adopt; required",
               type=host_address),
        Option("generic-ssh-user", "User pymachine logs in as; when not root, it needs passwordless sudo", "root"),
        Option("generic-ssh-key", "That user's private key (RSA, ECDSA or Ed25519, without passphrase), copied "
               "into the machine's directory [default: the first of ~/.ssh/id_ed25519, id_ecdsa, id_rsa]"),
        Option("generic-ssh-port", "SSH port of the server", 22, type=int),
        Option("generic-host-key-fingerprint", "Accept only this host key (SHA256:… as `ssh-keygen -l` prints "
               "it); without it, the key the server shows first is pinned and printed"),
        Option("generic-engine-address", "Address the engine is reached at, when SSH is not (a port forwarded to "
               "the server's SSH on 127.0.0.1, as docker-machine's VirtualBox machines have) [default: "
               "--generic-ip-address]", type=host_address),
    )

    # -- checks before anything is written --------------------------------------------------------------
    @classmethod
    def pre_create_check(cls, options: dict[str, Any]) -> None:
        address = (options.get("generic_ip_address") or "").strip()
        if not address:
            raise UsageError("--generic-ip-address is required: the address of the server to adopt")
        _check_address("--generic-ip-address", address)
        engine = options.get("generic_engine_address")
        if engine is not None:
            _check_address("--generic-engine-address", engine)
        port = options.get("generic_ssh_port")
        if not 0 < port < 65536:
            raise UsageError(f"--generic-ssh-port: {port} is not a port number")
        validate_user("--generic-ssh-user", options.get("generic_ssh_user") or "")
        if options.get("generic_host_key_fingerprint"):
            normalize_fingerprint(options["generic_host_key_fingerprint"])
        load_key(key_path(options))  # missing, unreadable or encrypted: one line now, nothing written

    # -- where the host is --------------------------------------------------------------------------------
    @property
    def ssh_user(self) -> str:  # type: ignore[override]
        return self.opts.get("generic_ssh_user") or "root"

    def ip(self) -> str | None:
        """The engine's address (the one its certificate names), which is SSH's unless --generic-engine-address."""
        o = self.opts
        return self.machine.resources.get("ip") or o.get("generic_engine_address") or o.get("generic_ip_address")

    def ssh_endpoint(self) -> Endpoint:
        return Endpoint(self.opts["generic_ip_address"], int(self.opts["generic_ssh_port"]), self.ssh_user)

    # -- create: adopt ------------------------------------------------------------------------------------
    def create(self) -> None:
        o = self.opts
        endpoint = self.ssh_endpoint()
        holder = _holder(self.store, self.machine, endpoint)
        if holder:
            raise MachineError(f"{endpoint.where} is already adopted as machine {holder!r} "
                               f"(remove it first with `pymachine rm {holder}`)")
        source = key_path(o)
        self.machine.record(ip=self.ip(), ssh_port=endpoint.port, ssh_key_file=KEY_FILE)
        write_atomic(self.machine.key_path, source.read_bytes(), 0o600)
        public = source.with_name(source.name + ".pub")
        if public.is_file():
            shutil.copyfile(public, self.machine.key_path.with_suffix(".pub"))
        conn = _Adopting(endpoint, self.machine.key_path, self.machine.known_hosts_path,
                         timeout=CONNECT_TIMEOUT, expected=o.get("generic_host_key_fingerprint"))
        try:
            conn.open()
        except MachineError:
            raise
        except _auth_errors() as e:
            raise MachineError(f"ssh to {endpoint.where} as {endpoint.user} with the key {source} "
                               f"was refused ({e})") from None
        except (OSError, EOFError, _ssh_errors()) as e:
            raise MachineError(f"cannot reach {endpoint.where} over SSH: {_reason(e)}") from None
        with conn:
            if endpoint.needs_become:
                check_root(conn, "provisioning needs it")
            conn.pin()

    # -- lifecycle: the host's power is not pymachine's ---------------------------------------------------
    def _not_ours(self, what: str) -> MachineError:
        return MachineError(f"{self.machine.name} is a generic (adopted) host: pymachine does not own its power "
                            f"and cannot {what} it (`pymachine restart {self.machine.name}` reboots it over SSH)")

    def not_running(self) -> MachineError:
        endpoint = self.ssh_endpoint()
        return MachineError(f"{self.machine.name}'s SSH server at {host_port(endpoint.host, endpoint.port)} does not "
                            f"answer: the adopted host is down or unreachable (pymachine does not own its power)")

    def start(self) -> None:
        raise self._not_ours("start")

    def stop(self) -> None:
        raise self._not_ours("stop")

    def kill(self) -> None:
        raise self._not_ours("kill")

    def restart(self) -> None:
        """Reboot over SSH, and return once the host answers SSH again with a new boot id."""
        from machine.commands.common import connect

        with connect(self.machine, self, timeout=30) as conn:
            before = conn.run(_BOOT, check=True).stdout.strip()
            endpoint = conn.endpoint
            if endpoint.needs_become:
                check_root(conn, f"cannot reboot {self.machine.name}")
            # Detached, so that the reboot does not wait on (or die with) this channel.
            reboot = ["sh", "-c", "sleep 1; systemctl reboot || reboot"]
            if endpoint.needs_become:
                reboot = as_user("root", reboot)
            with contextlib.suppress(MachineError):
                conn.run(f"nohup {shlex.join(reboot)} >/dev/null 2>&1 &", timeout=15)
        deadline = time.monotonic() + REBOOT_TIMEOUT
        while True:
            time.sleep(1)
            try:
                with Connection(self.ssh_endpoint(), self.machine.key_path, self.machine.known_hosts_path,
                                timeout=5).open() as conn:
                    if conn.run(_BOOT, timeout=10).stdout.strip() != before:
                        return
            except MachineError as e:
                if "host key" in str(e):
                    raise
            except (OSError, EOFError, _ssh_errors()):
                pass
            if time.monotonic() > deadline:
                raise MachineError(f"{self.machine.name} did not come back within {REBOOT_TIMEOUT:.0f}s of its reboot")

    def state(self) -> State:
        endpoint = self.ssh_endpoint()  # SSH answering is the host being up: the engine may be stopped
        if not endpoint.host:
            return State.ERROR
        try:
            with socket.create_connection((endpoint.host, endpoint.port), timeout=STATE_TIMEOUT):
                return State.RUNNING
        except (OSError, ValueError):
            return State.STOPPED

    # -- removal: forget the host -------------------------------------------------------------------------
    def remove(self) -> None:
        """Nothing of the host is pymachine's: `rm` only forgets it (the key copy goes with the directory)."""

    def leftovers(self) -> list[str]:
        return []


def _check_address(flag: str, address: str) -> None:
    ip, zone = address.partition("%")[::2]
    if zone and is_ip(ip):  # a link-local IPv6 address with its zone: fe80::1%eth0
        raise UsageError(f"{flag}: {address} names a zone (%{zone}), which neither the engine's certificate nor a "
                         f"DOCKER_HOST can carry; use one of the host's global or unique-local addresses")
    if not is_host(address):
        raise UsageError(f"{flag}: {address!r} is neither an IP address nor a host name")


def _holder(store, machine: Machine, endpoint: Endpoint) -> str | None:
    """The other machine of this store that adopted the same address and port, if any."""
    for name in store.names():
        if name == machine.name:
            continue
        try:
            other = store.load(name)
        except RecordDamaged:
            try:
                other = store.recover(name)
            except MachineError:
                continue
        except MachineError:
            continue
        if other.driver != GenericDriver.name:
            continue
        # Where its SSH is (its recorded `ip` is the engine's), normalised: a machine adopted before addresses
        # were may have recorded one as the user typed it.
        address = normal_host(str(other.options.get("generic_ip_address") or other.resources.get("ip") or ""))
        port = other.resources.get("ssh_port") or other.options.get("generic_ssh_port") or 22
        if address == endpoint.host and int(port) == endpoint.port:
            return name
    return None


def _auth_errors() -> tuple[type[BaseException], ...]:
    import paramiko

    return (paramiko.AuthenticationException,)


def _no_such_key() -> type[BaseException]:
    """What a login asking for a host key type the server has not raises."""
    import paramiko

    return paramiko.ssh_exception.IncompatiblePeer


def _ssh_errors() -> type[BaseException]:
    import paramiko

    return paramiko.SSHException


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


DRIVER = GenericDriver
