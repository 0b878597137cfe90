"""Provisioning end to end: a local machine's engine reached from the host with the real docker CLI."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine import certs, commands
from machine.store import Store
from tests.conftest import CLI
from tests.integration.conftest import busybox_image, machine_cli, machine_record
from tests.integration.test_local_userns import assert_in_its_range, host_ids, machine_processes

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Iterator[CLI]:
    """One home for the module's machines (provisioning is the slow part: share machines between tests)."""
    tmp = tmp_path_factory.mktemp("engine")
    yield from machine_cli(tmp / "home", DOCKER_CONFIG=str(tmp / "docker-config"), DOCKER_BUILDKIT="0")


def docker(cli: CLI, machine: str | None, *args: str, check: bool = True, flags: list[str] | None = None):
    """The real docker CLI, pointed at `machine` through `pymachine config` (or given explicit flags)."""
    tls = flags if flags is not None else cli("config", machine).stdout.split()
    proc = subprocess.run(["docker", *tls, *args], env=cli.env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def build_busybox(cli: CLI, machine: str, tmp_path: Path) -> None:
    docker(cli, machine, "build", "-q", "-t", "pm-busybox", str(busybox_image(tmp_path)))


@pytest.fixture(scope="module")
def web(cli) -> str:
    cli("create", "--engine-install", "distro", "--engine-bip", "10.250.7.1/24", "--engine-label", "team=ops",
        "web", timeout=900)
    return "web"


def test_engine_runs_containers_over_mutual_tls(cli, web, tmp_path):
    info = json.loads(docker(cli, web, "info", "--format", "{{json .}}").stdout)
    assert info["Driver"] == "overlay2"
    assert "team=ops" in info["Labels"]
    bridge = json.loads(docker(cli, web, "network", "inspect", "bridge").stdout)[0]
    assert bridge["IPAM"]["Config"][0]["Subnet"] == "10.250.7.0/24"

    build_busybox(cli, web, tmp_path)
    out = docker(cli, web, "run", "--rm", "pm-busybox", "echo", "hello from a container").stdout
    assert out.strip() == "hello from a container"
    # Container traffic leaves through the engine's NAPT on the machine.
    nat = cli("ssh", web, "--", "iptables -t nat -S POSTROUTING").stdout
    assert "-s 10.250.7.0/24 ! -o docker0 -j MASQUERADE" in nat

    # The same through the machine's docker context (and through `pymachine env`: test_env_in_each_shell).
    server_os = docker(cli, None, "--context", "web", "version", "--format", "{{.Server.Os}}", flags=[]).stdout
    assert server_os.strip() == "linux"


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []  # gone meanwhile


def test_the_machine_and_its_containers_run_as_unprivileged_host_uids(cli, web, tmp_path):
    """The default isolation: a user namespace. Nothing of the machine, not even a --privileged container of its
    engine, is the host's root; the engine's data is stored in the machine's range."""
    shift, count = assert_in_its_range(cli, web)
    build_busybox(cli, web, tmp_path)
    docker(cli, web, "run", "-d", "--name", "sleeper", "pm-busybox", "sleep", "600")
    docker(cli, web, "run", "-d", "--privileged", "--name", "privileged", "pm-busybox", "sleep", "600")
    try:
        record = machine_record(cli, web)
        sleepers = [pid for pid in machine_processes(record) if cmdline(pid)[:3] == ["/bin/busybox", "sleep", "600"]]
        assert len(sleepers) == 2
        for pid in sleepers:
            assert all(shift <= i < shift + count for i in host_ids(pid)), host_ids(pid)
        # Root in the privileged container is the machine's root, not the host's: it cannot make device nodes.
        proc = docker(cli, web, "exec", "privileged", "/bin/busybox", "mknod", "/sda", "b", "8", "0", check=False)
        assert proc.returncode != 0 and "Operation not permitted" in proc.stderr, proc.stderr
        assert "dockerd" in machine_processes(record).values()
    finally:
        docker(cli, web, "rm", "-f", "sleeper", "privileged")
    layers = cli.home / "machines" / web / "layer/volumes/docker"
    assert {path.stat().st_uid for path in layers.iterdir()} == {shift}  # image, container and network data


def test_engine_refuses_clients_without_our_certificate(cli, web, tmp_path):
    ip = cli("ip", web).stdout.strip()
    flags = cli("config", web).stdout.split()
    ca_flag = next(f for f in flags if f.startswith("--tlscacert="))
    no_cert = docker(cli, None, "version", check=False, flags=["--tlsverify", ca_flag, f"-H=tcp://{ip}:2376"])
    assert no_cert.returncode != 0 and "Server:" not in no_cert.stdout

    other = tmp_path / "other-ca"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/CN=stranger", "-days", "1", "-keyout", str(other) + "-key.pem",
                    "-out", str(other) + "-cert.pem"], check=True, capture_output=True)
    stranger = docker(cli, None, "version", check=False, flags=[
        "--tlsverify", ca_flag, f"--tlscert={other}-cert.pem", f"--tlskey={other}-key.pem", f"-H=tcp://{ip}:2376"])
    assert stranger.returncode != 0 and "Server:" not in stranger.stdout

    with pytest.raises(OSError), socket.create_connection((ip, 2375), timeout=2):
        pass  # never unauthenticated TCP


def test_reprovision_changes_nothing_and_check_reports_drift(cli, web):
    again = cli("provision", web).stdout
    assert f"{web} : " in again and " changed=0 " in again and " failed=0 " in again, again

    cli("ssh", web, "--", "echo '# drift' >> /etc/modules-load.d/pymachine.conf")
    check = cli("provision", "--check", "--diff", web).stdout
    assert " changed=1 " in check and "modules-load.d/pymachine.conf" in check, check
    assert "# drift" in cli("ssh", web, "--", "cat /etc/modules-load.d/pymachine.conf").stdout  # unchanged
    fixed = cli("provision", web).stdout
    assert " changed=1 " in fixed, fixed
    assert "# drift" not in cli("ssh", web, "--", "cat /etc/modules-load.d/pymachine.conf").stdout

    # A sysctl's drift is reported by --check, not a failure of the bridge's check that the real run would pass.
    cli("ssh", web, "--", "echo 0 > /proc/sys/net/ipv4/ip_forward")
    check = cli("provision", "--check", web).stdout
    assert " changed=1 " in check and " failed=0 " in check and "Apply sysctls" in check, check
    assert cli("ssh", web, "--", "cat /proc/sys/net/ipv4/ip_forward").stdout == "0\n"
    fixed = cli("provision", web).stdout
    assert " changed=1 " in fixed and " failed=0 " in fixed, fixed
    assert cli("ssh", web, "--", "cat /proc/sys/net/ipv4/ip_forward").stdout == "1\n"


def test_broken_roles_fail_clearly_and_leave_the_machine_usable(cli, web, tmp_path):
    roles = tmp_path / "roles"
    shutil.copytree(Path(__file__).parents[2] / "roles", roles)  # templates/ symlinks copied as files
    cli.env["PYMACHINE_ROLES_PATH"] = str(roles)
    tasks = roles / "kernel/tasks/main.yml"
    original = tasks.read_text()
    try:
        tasks.write_text(original + "\n- name: a typo\n  ansible.builtin.nosuchmodule: {}\n")
        proc = cli("provision", web, check=False)
        assert proc.returncode == 1 and "nosuchmodule" in proc.stderr and "kernel/tasks/main.yml:" in proc.stderr

        tasks.write_text(original + "\n- name: [unclosed\n")
        proc = cli("provision", web, check=False)
        assert proc.returncode == 1 and "kernel/tasks/main.yml" in proc.stderr

        tasks.write_text(original + "\n- name: this task fails\n  ansible.builtin.command: /bin/false\n")
        proc = cli("provision", web, check=False)
        assert proc.returncode == 1 and "this task fails" in proc.stderr

        assert cli("ssh", web, "--", "systemctl is-active docker").stdout.strip() == "active"
    finally:
        del cli.env["PYMACHINE_ROLES_PATH"]
    assert " failed=0 " in cli("provision", web).stdout


def test_vfs_storage_driver(cli, tmp_path):
    cli("create", "--engine-install", "distro", "--engine-storage-driver", "vfs", "store", timeout=900)
    assert docker(cli, "store", "info", "--format", "{{.Driver}}").stdout.strip() == "vfs"
    build_busybox(cli, "store", tmp_path)
    assert docker(cli, "store", "run", "--rm", "pm-busybox", "echo", "vfs ok").stdout.strip() == "vfs ok"
    cli("rm", "-y", "store")
    assert docker(cli, None, "context", "ls", "-q", flags=[]).stdout.split().count("store") == 0


def test_env_refuses_a_stale_certificate_until_regenerated(cli, web):
    """As after an address change: the engine's certificate no longer names the machine's IP."""
    machine_dir = cli.home / "machines" / web
    ca = certs.Pair(cli.home / "certs/ca.pem", cli.home / "certs/ca-key.pem")
    certs.issue_server(ca, certs.Pair(machine_dir / "server.pem", machine_dir / "server-key.pem"), web, ["192.0.2.1"])
    stale = cli("env", web, check=False)
    assert stale.returncode == 1 and f"pymachine regenerate-certs {web}" in stale.stderr

    cli("regenerate-certs", "-f", web)  # -f, as docker-machine's scripts pass it
    ip = cli("ip", web).stdout.strip()
    served = subprocess.run(f"openssl s_client -connect {ip}:2376 </dev/null 2>/dev/null | openssl x509 -noout -serial",
                            shell=True, capture_output=True, text=True).stdout
    ours = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(machine_dir / "server.pem")],
                          capture_output=True, text=True).stdout
    assert served == ours and served.startswith("serial=")
    assert "DOCKER_HOST" in cli("env", web).stdout
    assert docker(cli, web, "info", "--format", "{{.Driver}}").stdout.strip() == "overlay2"


# How each shell loads `pymachine env` output, and then clears it with `--unset`.
SOURCE = {
    "bash": 'eval "$(pymachine env --shell bash {args})"',
    "sh": 'eval "$(pymachine env --shell sh {args})"',
    "zsh": 'eval "$(pymachine env --shell zsh {args})"',
    "fish": "pymachine env --shell fish {args} | source",
}
DOCKER_VARS = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_MACHINE_NAME")


@pytest.mark.parametrize("shell", list(SOURCE))
def test_env_in_each_shell_reaches_the_engine_and_unset_clears_it(cli, web, shell):
    """PowerShell and cmd are not installable here: tests/unit/test_shellenv.py compares their syntax as text."""
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (scripts/setup installs it)")
    script = "\n".join([SOURCE[shell].format(args=web), "docker info --format '{{.Name}}'",
                        SOURCE[shell].format(args="--unset"), "env"])
    # The installed `pymachine` command, found on PATH as a user's shell finds it.
    env = cli.env | {"PATH": f"{Path(sys.executable).parent}:{cli.env['PATH']}"}
    proc = subprocess.run([shell, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    engine_name, *exported = proc.stdout.splitlines()
    assert engine_name == web  # the machine's engine answered, over TLS with the machine's certificates
    assert [line for line in exported if line.startswith(DOCKER_VARS)] == []
    assert f"DOCKER_CONFIG={cli.env['DOCKER_CONFIG']}" in exported  # --unset clears only what env sets


def apt_policy(cli: CLI, machine: str, package: str) -> tuple[str, str]:
    """(Installed, Candidate) versions of `package` on the machine, as apt sees them."""
    out = cli("ssh", machine, "--", f"apt-cache policy {package}").stdout
    versions = dict(re.findall(r"^\s+(Installed|Candidate): (\S+)$", out, re.M))
    return versions["Installed"], versions["Candidate"]


def test_upgrade_installs_the_candidate_engine_and_then_changes_nothing(cli, web, tmp_path):
    # The mirror offers one docker.io, the one create installed. Make the machine out of date by recording an
    # older installed version in dpkg's database: apt then sees an upgrade that `pymachine upgrade` must make.
    cli("ssh", web, "--", r"sed -i '/^Package: docker.io$/,/^$/ s/^\(Version: .*\)$/\1~pmold/' /var/lib/dpkg/status")
    installed, candidate = apt_policy(cli, web, "docker.io")
    assert installed == f"{candidate}~pmold"

    cli("upgrade", web, timeout=900)
    assert apt_policy(cli, web, "docker.io") == (candidate, candidate)
    assert cli("ssh", web, "--", "systemctl is-active docker").stdout.strip() == "active"
    # docker-machine's `version NAME`: the engine's version, asked over TLS.
    server = docker(cli, web, "version", "--format", "{{.Server.Version}}").stdout.strip()
    assert cli("version", web).stdout.strip() == server != ""
    build_busybox(cli, web, tmp_path)
    assert docker(cli, web, "run", "--rm", "pm-busybox", "echo", "upgraded").stdout.strip() == "upgraded"

    # Already the newest: a second upgrade changes nothing. (The CLI prints its recap only on a terminal.)
    recap = commands.upgrade(Store(cli.home), web)
    assert (recap.failed, recap.changed) == (0, 0), recap.line


def test_podman_serves_the_docker_api_over_tls(cli, tmp_path):
    cli("create", "--engine", "podman", "--engine-install", "distro", "--engine-storage-driver", "vfs", "pod",
        timeout=900)
    build_busybox(cli, "pod", tmp_path)
    assert docker(cli, "pod", "run", "--rm", "pm-busybox", "echo", "podman ok").stdout.strip() == "podman ok"
    assert cli("version", "pod").stdout.strip() == cli("ssh", "pod", "--", "podman --version").stdout.split()[-1]
    ip = cli("ip", "pod").stdout.strip()
    ca_flag = next(f for f in cli("config", "pod").stdout.split() if f.startswith("--tlscacert="))
    assert docker(cli, None, "version", check=False, flags=["--tlsverify", ca_flag, f"-H=tcp://{ip}:2376"]).returncode


def test_btrfs_on_a_loop_file_survives_a_restart_and_rm_releases_it(cli):
    # Loop devices are the host root's: only a privileged machine can host btrfs on a loop file.
    cli("create", "--local-isolation", "privileged", "--engine-install", "distro", "--engine-storage-driver", "btrfs",
        "cow", timeout=900)
    assert docker(cli, "cow", "info", "--format", "{{.Driver}}").stdout.strip() == "btrfs"
    cli("restart", "cow")
    assert cli("ssh", "cow", "--", "findmnt -n -o FSTYPE /var/lib/docker").stdout.strip() == "btrfs"
    assert docker(cli, "cow", "info", "--format", "{{.Driver}}").stdout.strip() == "btrfs"
    machine_dir = cli.home / "machines" / "cow"
    cli("rm", "-y", "cow")
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(machine_dir) not in loops
