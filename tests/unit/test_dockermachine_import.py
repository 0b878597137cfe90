"""`pymachine import` refuses, in one line and writing nothing, what is not a usable docker-machine machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from machine import certs
from machine.commands import dockermachine
from tests.unit import sshserver


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "machine", "import", *args], capture_output=True, text=True,
                          env={"PYMACHINE_HOME": str(home), "PATH": "/usr/bin:/bin", "HOME": str(home.parent)})


def machine_dir(store: Path, name: str, record: object) -> Path:
    directory = store / "machines" / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(record))
    return directory


DM_RECORD = {"ConfigVersion": 3, "Name": "dm1", "DriverName": "generic", "HostOptions": {},
             "Driver": {"IPAddress": "127.0.0.1", "SSHUser": "root", "SSHPort": 22}}


@pytest.mark.parametrize(("case", "message"), [
    ("pymachine's own store", "config.json: not docker-machine's config.json (no Driver, DriverName and HostOptions)"),
    ("not json", "config.json: not docker-machine's config.json ("),
    ("no such machine", "has no docker-machine machine 'dm1'"),
    ("no address", "docker-machine recorded no IP address for 'dm1'"),
    ("no certificates", "lacks ca.pem, cert.pem, key.pem, server.pem, server-key.pem: import it with --regen"),
])
def test_what_cannot_be_imported_is_one_line_and_nothing_is_written(tmp_path: Path, case: str, message: str):
    dm = tmp_path / "dm"
    (dm / "machines").mkdir(parents=True)
    if case == "pymachine's own store":
        machine_dir(dm, "dm1", {"name": "dm1", "driver": "local", "id": "x", "options": {}, "resources": {}})
    elif case == "not json":
        (machine_dir(dm, "dm1", {}) / "config.json").write_text("{")
    elif case == "no address":
        machine_dir(dm, "dm1", {**DM_RECORD, "Driver": {"IPAddress": ""}})
    elif case == "no certificates":
        machine_dir(dm, "dm1", DM_RECORD)
    home = tmp_path / "home"
    proc = run(home, str(dm), "dm1")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymachine: error: ") and message in lines[0], proc.stderr
    assert not (home / "machines").exists() or not any((home / "machines").iterdir())


def test_a_store_without_names_is_refused(tmp_path: Path):
    (tmp_path / "dm" / "machines").mkdir(parents=True)
    proc = run(tmp_path / "home", str(tmp_path / "dm"))
    assert proc.returncode == 2 and "import: name the machines of" in proc.stderr


def test_a_failed_regenerate_certs_import_is_rolled_back_and_can_be_run_again(cli, tmp_path: Path):
    """The host answers the adoption's login, then goes away before it is provisioned: nothing is imported, and a
    second import fails for the same reason, not because the name is taken."""
    user_key = sshserver.keygen(tmp_path / "id_rsa", "rsa")
    host_key = paramiko.PKey.from_path(sshserver.keygen(tmp_path / "host_key"))
    server = sshserver.Server("127.0.0.1", [host_key], paramiko.PKey.from_path(user_key), connections=1)
    dm = tmp_path / "dm"
    machine_dir(dm, "dm1", {**DM_RECORD, "Driver": {"IPAddress": "127.0.0.1", "SSHUser": "root",
                                                    "SSHPort": server.port, "SSHKeyPath": str(user_key)}})
    cli.env["PYMACHINE_SSH_PERSIST"] = "0"  # one login (paramiko's, kept for the wait that follows)
    try:
        proc = cli("import", "--regenerate-certs", str(dm), "dm1", check=False)
    finally:
        server.close()
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"pymachine: error: dm1: not imported: provisioning it for --regenerate-certs failed (dm1's SSH server at "
        f"127.0.0.1:{server.port} does not answer: the adopted host is down or unreachable (pymachine does not own "
        f"its power)); import it again once that is fixed")
    assert cli("ls", "-q").stdout == ""
    assert not any((cli.home / "machines").iterdir())
    again = cli("import", "--regenerate-certs", str(dm), "dm1", check=False)
    assert again.returncode == 1 and "already exists" not in again.stderr
    assert again.stderr.splitlines()[-1].startswith("pymachine: error: dm1: cannot reach 127.0.0.1:")


def test_a_virtualbox_machine_is_reached_over_ssh_on_loopback_and_its_engine_at_its_address(tmp_path: Path):
    """docker-machine's VirtualBox driver forwards 127.0.0.1:SSHPort to the VM's SSH (GetSSHHostname is 127.0.0.1);
    IPAddress is the host-only adapter's, where the engine listens."""
    host = {**DM_RECORD, "DriverName": "virtualbox",
            "Driver": {"IPAddress": "192.168.99.100", "SSHUser": "docker", "SSHPort": 53211}}
    options = dockermachine.generic_options(tmp_path, "dm1", host)
    assert options["generic_ip_address"] == "127.0.0.1" and options["generic_ssh_port"] == "53211"
    assert options["generic_engine_address"] == "192.168.99.100"
    generic = dockermachine.generic_options(tmp_path, "dm1", {**host, "DriverName": "generic"})
    assert generic["generic_ip_address"] == "192.168.99.100" and generic["generic_engine_address"] is None


def test_an_imported_virtualbox_machine_logs_in_on_loopback_and_env_names_the_engine_address(cli, tmp_path: Path):
    """For real: its SSH on 127.0.0.1:port (a server in this process), its engine's address 127.0.0.99 (where
    nothing listens: the test reaches no VirtualBox network), certificates from docker-machine's store."""
    user_key = sshserver.keygen(tmp_path / "id_rsa", "rsa")
    server = sshserver.Server("127.0.0.1", [paramiko.PKey.from_path(sshserver.keygen(tmp_path / "host_key"))],
                              paramiko.PKey.from_path(user_key))
    dm = tmp_path / "dm"
    source = machine_dir(dm, "vb1", {**DM_RECORD, "Name": "vb1", "DriverName": "virtualbox", "Driver": {
        "IPAddress": "127.0.0.99", "SSHUser": "docker", "SSHPort": server.port, "SSHKeyPath": str(user_key)}})
    (tmp_path / "dm-certs").mkdir()
    ca, client = certs.ensure_ca(tmp_path / "dm-certs")
    certs.issue_server(ca, certs.Pair(source / "server.pem", source / "server-key.pem"), "vb1", ["127.0.0.99"])
    for pem, name in ((ca.cert, "ca.pem"), (client.cert, "cert.pem"), (client.key, "key.pem")):
        shutil.copyfile(pem, source / name)
    try:
        cli("import", str(dm), "vb1")
        inspect = json.loads(cli("inspect", "vb1").stdout)
        assert (inspect["ssh"]["host"], inspect["ssh"]["port"]) == ("127.0.0.1", server.port)
        assert cli("status", "vb1").stdout.strip() == "Running"
        assert 'export DOCKER_HOST="tcp://127.0.0.99:2376"' in cli("env", "vb1").stdout
        assert cli("ssh", "vb1", "--", "true").returncode == 0
    finally:
        server.close()
        cli("rm", "-y", "vb1", check=False)
