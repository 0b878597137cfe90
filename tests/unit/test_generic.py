"""The generic driver's option parsing and checks, without a server."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from machine.commands import parse_driver_options
from machine.drivers import generic
from machine.drivers.base import State
from machine.errors import MachineError, UsageError
from machine.store import Store


def keygen(path: Path, kind: str = "ed25519", passphrase: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-f", str(path)], check=True)
    return path


def options(**values) -> dict:
    return parse_driver_options("generic", {k: v for k, v in values.items()})


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for variable in ("PYMACHINE_GENERIC_SSH_KEY", "PYMACHINE_GENERIC_IP_ADDRESS", "PYMACHINE_GENERIC_SSH_PORT",
                     "PYMACHINE_GENERIC_SSH_USER", "PYMACHINE_GENERIC_HOST_KEY_FINGERPRINT"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


def test_defaults_are_docker_machines(home):
    parsed = options(generic_ip_address="192.0.2.10")
    assert parsed == {"generic_ip_address": "192.0.2.10", "generic_ssh_user": "root", "generic_ssh_key": None,
                      "generic_ssh_port": 22, "generic_host_key_fingerprint": None}
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
                listener.accept()[0].close()

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
