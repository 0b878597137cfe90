"""The generic driver's option parsing and checks, without a server."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import paramiko
import pytest

from machine import certs, sshmux
from machine.commands import create, parse_driver_options
from machine.commands.common import connect, load
from machine.drivers import generic
from machine.drivers.base import State
from machine.errors import MachineError, UsageError
from machine.ssh import Connection
from machine.store import Store
from tests.unit import sshserver


def keygen(path: Path, kind: str = "ed25519", passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-f", str(path)], check=True)
    return path


def options(**values) -> dict:
    return parse_driver_options("generic", {k: v for k, v in values.items()})


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for variable in ("PYMACHINE_GENERIC_SSH_KEY", "PYMACHINE_GENERIC_IP_ADDRESS", "PYMACHINE_GENERIC_SSH_PORT",
                     "PYMACHINE_GENERIC_SSH_USER", "PYMACHINE_GENERIC_HOST_KEY_FINGERPRINT",
                     "PYMACHINE_GENERIC_ENGINE_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


def test_defaults_are_docker_machines(home):
    parsed = options(generic_ip_address="192.0.2.10")
    assert parsed == {"generic_ip_address": "192.0.2.10", "generic_ssh_user": "root", "generic_ssh_key": None,
                      "generic_ssh_port": 22, "generic_host_key_fingerprint": None, "generic_engine_address": None}
    assert options(generic_ip_address="h", generic_ssh_port="2222")["generic_ssh_port"] == 2222


def test_a_bad_port_is_a_usage_error(home):
    with pytest.raises(UsageError, match="--generic-ssh-port: 'ssh' is not a valid int"):
        options(generic_ip_address="h", generic_ssh_port="ssh")


def test_other_drivers_flags_are_refused(home):
    with pytest.raises(UsageError, match="--local-bridge is not an option of the generic driver"):
        options(generic_ip_address="h", local_bridge="br0")


def test_the_address_is_required(home):
    keygen(home / "key")
    with pytest.raises(UsageError, match="--generic-ip-address is required"):
        generic.GenericDriver.pre_create_check(options(generic_ssh_key=str(home / "key")))
    with pytest.raises(UsageError, match="neither an IP address nor a host name"):
        generic.GenericDriver.pre_create_check(options(generic_ip_address="ssh://h", generic_ssh_key=str(home / "key")))


def test_an_ipv6_zone_is_refused_naming_it(home):
    for flag in ("generic_ip_address", "generic_engine_address"):
        values = {"generic_ip_address": "2001:db8::7", flag: "fe80::1%eth0"}
        with pytest.raises(UsageError, match=re.escape(f"--{flag.replace('_', '-')}: fe80::1%eth0 names a zone "
                                                       f"(%eth0), which neither the engine's certificate nor")):
            generic.GenericDriver.pre_create_check(options(**values))


def test_the_key_defaults_to_what_ssh_would_offer_first(home):
    with pytest.raises(UsageError, match=r"none of ~/.ssh/\{id_ed25519,id_ecdsa,id_rsa\} exists"):
        generic.key_path(options(generic_ip_address="h"))
    (home / ".ssh").mkdir()
    rsa = keygen(home / ".ssh/id_rsa", "rsa")
    assert generic.key_path(options(generic_ip_address="h")) == rsa
    ed25519 = keygen(home / ".ssh/id_ed25519")
    assert generic.key_path(options(generic_ip_address="h")) == ed25519
    assert generic.key_path(options(generic_ip_address="h", generic_ssh_key="~/.ssh/id_rsa")) == rsa


@pytest.mark.parametrize("kind", ["rsa", "ecdsa", "ed25519"])
def test_every_key_type_is_accepted(home, kind):
    key = keygen(home / kind, kind)
    generic.GenericDriver.pre_create_check(options(generic_ip_address="192.0.2.1", generic_ssh_key=str(key)))


def test_an_encrypted_or_missing_key_is_one_line(home):
    key = keygen(home / "enc", passphrase="secret")
    with pytest.raises(MachineError, match=f"the ssh key {key} is encrypted: pymachine needs a key without"):
        generic.GenericDriver.pre_create_check(options(generic_ip_address="h", generic_ssh_key=str(key)))
    with pytest.raises(UsageError, match="no such file"):
        generic.GenericDriver.pre_create_check(options(generic_ip_address="h", generic_ssh_key=str(home / "no")))
    (home / "junk").write_text("not a key\n")
    with pytest.raises(MachineError, match="cannot read the ssh key"):
        generic.GenericDriver.pre_create_check(options(generic_ip_address="h", generic_ssh_key=str(home / "junk")))


def test_fingerprints(home):
    key = keygen(home / "k")
    printed = subprocess.run(["ssh-keygen", "-lf", f"{key}.pub"], capture_output=True, text=True,
                             check=True).stdout.split()[1]
    import paramiko

    paramiko_fp = paramiko.PKey.from_path(key).fingerprint  # with base64's padding
    assert generic.fingerprint_matches(paramiko_fp, printed)
    assert generic.fingerprint_matches(printed, printed + "=")
    assert not generic.fingerprint_matches(paramiko_fp, "SHA256:" + "A" * 43)
    for bad in ("MD5:aa:bb", "SHA256:short", printed.removeprefix("SHA256:")):
        with pytest.raises(UsageError, match="--generic-host-key-fingerprint"):
            generic.GenericDriver.pre_create_check(options(generic_ip_address="h", generic_ssh_key=str(key),
                                                           generic_host_key_fingerprint=bad))


def test_state_is_a_tcp_connect(tmp_path, home):
    store = Store(tmp_path / "store")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    with store.reserve("h", "generic", options(generic_ip_address="127.0.0.1", generic_ssh_port=str(port))) as m:
        driver = generic.GenericDriver(m, store)
        assert driver.state() == State.RUNNING
        listener.close()
        assert driver.state() == State.STOPPED
        for method in (driver.start, driver.stop, driver.kill):
            with pytest.raises(MachineError, match="pymachine does not own its power"):
                method()
        assert driver.leftovers() == []


def test_a_down_host_is_not_told_to_be_started(cli, home):
    """`pymachine start` cannot power an adopted host: what needs it up names the SSH server that did not answer."""
    with socket.socket() as gone:
        gone.bind(("127.0.0.1", 0))
        port = gone.getsockname()[1]  # bound, never listening: a refused connection
        cli.home.mkdir(parents=True)
        with Store(cli.home).reserve("web", "generic", options(generic_ip_address="127.0.0.1",
                                                               generic_ssh_port=str(port))) as machine:
            machine.state = "ready"
        for command in (("provision", "web"), ("url", "web"), ("ssh", "web", "true")):
            proc = cli(*command, check=False)
            assert proc.returncode == 1, command
            assert proc.stderr == (f"pymachine: error: web's SSH server at 127.0.0.1:{port} does not answer: the "
                                   f"adopted host is down or unreachable (pymachine does not own its power)\n"), command


def test_a_port_that_speaks_no_ssh_is_one_line(cli, home):
    """A wrong port whose server closes at once (a web server, say): paramiko's thread logs its traceback, and
    logging's last resort would print it; the user gets pymachine's one line, and nothing is left behind."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def close_every_connection() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection = listener.accept()[0]
                # The client's banner read first: closed with it unread, the kernel would reset the connection,
                # and the message would depend on which of the two the client saw.
                connection.recv(256)
                connection.close()

    threading.Thread(target=close_every_connection, daemon=True).start()
    try:
        proc = cli("create", "--driver", "generic", "--generic-ip-address", "127.0.0.1", "--generic-ssh-port",
                   str(port), "--generic-ssh-key", str(keygen(home / "key")), "web", check=False)
    finally:
        listener.close()
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Exception (client)" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (f"pymachine: error: cannot reach 127.0.0.1:{port} over SSH: Error "
                                            f"reading SSH protocol banner")
    assert cli("ls", "-q").stdout == ""


def test_help_names_the_defaults_and_rm_has_uninstall():
    from click.testing import CliRunner

    from machine.cli import cli

    create = CliRunner().invoke(cli, ["create", "--help"], terminal_width=200).output
    assert "--generic-ssh-key" in create and "~/.ssh/id_ed25519, id_ecdsa, id_rsa" in create
    assert "--generic-host-key-fingerprint" in create
    assert "--uninstall" in CliRunner().invoke(cli, ["rm", "--help"]).output


# -- IPv6: adopted for real, from an SSH server in this process listening on ::1 -----------------------------
@pytest.fixture
def v6_server(home) -> Iterator[sshserver.Server]:
    user = keygen(home / "user_key")
    host_key = paramiko.PKey.from_path(keygen(home / "host_ed25519"))
    server = sshserver.Server("::1", [host_key], paramiko.PKey.from_path(user))
    yield server
    server.close()


@pytest.fixture
def kept_connections(monkeypatch) -> Iterator[None]:
    """sshmux on, its sockets in a short directory of the test's own (pytest's paths are too long for a socket)."""
    short = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    monkeypatch.delenv(sshmux.PERSIST_ENV, raising=False)
    yield
    shutil.rmtree(short)


def test_an_ipv6_address_is_recorded_canonical_and_bracketed_in_urls_and_pins(cli, home, v6_server, kept_connections):
    store = Store(cli.home)
    spelled = "0:0:0:0:0:0:0:01"  # ::1 as a user may type it
    create(store, "v6", "generic", {"generic_ip_address": spelled, "generic_ssh_port": str(v6_server.port),
                                    "generic_ssh_key": str(home / "user_key")}, provision=False)
    machine, driver = load(store, "v6")
    assert machine.options["generic_ip_address"] == "::1" and driver.ip() == "::1"
    url = driver.engine_url()
    assert url == "tcp://[::1]:2376"
    assert (urlparse(url).hostname, urlparse(url).port) == ("::1", 2376)  # what create's wait for the engine reads
    assert machine.known_hosts_path.read_text().startswith(f"[::1]:{v6_server.port} ssh-ed25519 ")
    # Logins after the first: paramiko finds the pinned key under its bracketed name, and OpenSSH's kept
    # connection (sshmux) is given the address on its command line.
    with connect(machine, driver):
        pass
    master = sshmux.Master(shutil.which("ssh"), driver.ssh_endpoint(), machine.key_path, machine.known_hosts_path, 5)
    try:
        assert master.connect() and master.listening()
    finally:
        sshmux.forget(machine.known_hosts_path)
    # env: the certificate's SANs are canonical, as the address now is; DOCKER_HOST is a URL docker can read.
    ca, _ = certs.ensure_ca(store.certs())
    certs.issue_server(ca, certs.server_pair(machine.dir), "v6", driver.cert_names())
    shutil.copyfile(store.certs_dir / "cert.pem", machine.dir / "cert.pem")
    assert cli("env", "v6").stdout.splitlines()[1] == 'export DOCKER_HOST="tcp://[::1]:2376"'
    # Adopting the same host again under another spelling is the same host.
    again = cli("create", "--driver", "generic", "--generic-ip-address", "::0:1", "--generic-ssh-port",
                str(v6_server.port), "--generic-ssh-key", str(home / "user_key"), "--no-provision", "v6b",
                check=False)
    assert again.returncode == 1
    assert again.stderr.strip().endswith(f"[::1]:{v6_server.port} is already adopted as machine 'v6' "
                                         f"(remove it first with `pymachine rm v6`)")


def test_env_takes_an_address_recorded_in_another_spelling(cli, home):
    """A machine adopted before addresses were normalised: its certificate names the canonical form."""
    store = Store(cli.home)
    with store.reserve("old", "generic", {"generic_ip_address": "2001:DB8::05"}) as machine:
        machine.record(ip="2001:DB8::05")
        machine.state = "ready"
        machine.save()
    machine, driver = load(store, "old")
    ca, _ = certs.ensure_ca(store.certs())
    certs.issue_server(ca, certs.server_pair(machine.dir), "old", driver.cert_names())
    shutil.copyfile(store.certs_dir / "cert.pem", machine.dir / "cert.pem")
    proc = cli("env", "old", check=False)
    assert proc.returncode == 0, proc.stderr
    assert 'export DOCKER_HOST="tcp://[2001:DB8::05]:2376"' in proc.stdout


# -- --generic-host-key-fingerprint on a host with keys of several types -----------------------------------
@pytest.fixture
def many_keys(home) -> Iterator[tuple[sshserver.Server, dict[str, paramiko.PKey]]]:
    keygen(home / "user_key")
    keys = {kind: paramiko.PKey.from_path(keygen(home / f"host_{kind}", kind)) for kind in ("ed25519", "ecdsa", "rsa")}
    server = sshserver.Server("127.0.0.1", list(keys.values()), paramiko.PKey.from_path(home / "user_key"))
    yield server, keys
    server.close()


@pytest.mark.parametrize("kind", ["ecdsa", "rsa", "ed25519"])
def test_the_fingerprint_of_any_of_the_hosts_keys_is_accepted_and_that_key_pinned(cli, home, many_keys,
                                                                                  kept_connections, kind):
    server, keys = many_keys
    store = Store(cli.home)
    create(store, "fp", "generic", {"generic_ip_address": "127.0.0.1", "generic_ssh_port": str(server.port),
                                    "generic_ssh_key": str(home / "user_key"),
                                    "generic_host_key_fingerprint": sshserver.fingerprint(keys[kind])},
           provision=False)
    machine, driver = load(store, "fp")
    name, key = machine.known_hosts_path.read_text().split()[1:]
    assert (name, key) == (keys[kind].get_name(), keys[kind].get_base64())
    # Later logins ask for that key's type only (an RSA key with SHA-2 signatures), with paramiko and OpenSSH.
    with Connection(driver.ssh_endpoint(), machine.key_path, machine.known_hosts_path).open() as conn:
        assert conn.transport.get_remote_server_key() == keys[kind]
    master = sshmux.Master(shutil.which("ssh"), driver.ssh_endpoint(), machine.key_path, machine.known_hosts_path, 5)
    try:
        assert master.connect() and master.listening()
    finally:
        sshmux.forget(machine.known_hosts_path)


def test_a_fingerprint_none_of_the_hosts_keys_has_names_them_all(cli, home, many_keys):
    server, keys = many_keys
    wrong = "SHA256:" + "A" * 43
    proc = cli("create", "--driver", "generic", "--generic-ip-address", "127.0.0.1", "--generic-ssh-port",
               str(server.port), "--generic-ssh-key", str(home / "user_key"), "--generic-host-key-fingerprint", wrong,
               "--no-provision", "fp", check=False)
    assert proc.returncode == 1
    shown = ", ".join(sshserver.fingerprint(keys[kind]) for kind in ("ed25519", "ecdsa", "rsa"))
    assert proc.stderr.splitlines() == [f"pymachine: error: host keys of [127.0.0.1]:{server.port} are {shown}, not "
                                        f"{wrong} (--generic-host-key-fingerprint); refusing to connect"]
    assert cli("ls", "-q").stdout == ""
