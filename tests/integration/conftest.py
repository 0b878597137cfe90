"""Integration fixtures: real local machines on a test bridge of their own, torn down even on failure."""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine import sshmux
from machine.paths import roles_dir
from machine.provision import ROLES
from tests.conftest import CLI, http_on_loopback
from tests.integration import docker_repo
from tests.integration.libvirt_host import boot_image, require_libvirt, virsh

# Overridable so that two runs on one host do not share a bridge. Each pytest-xdist worker gets a bridge and a
# subnet of its own too (gw1: pmtest01 and the /24 below): tests check that `rm` leaves nothing on the bridge, and
# another worker's machines would be there.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
BRIDGE = os.environ.get("PYMACHINE_TEST_BRIDGE", "pmtest0") + (str(_WORKER) if _WORKER else "")
_NETWORK = ipaddress.ip_network(os.environ.get("PYMACHINE_TEST_SUBNET", "10.231.250.0/24"))
SUBNET = str(ipaddress.ip_network((int(_NETWORK.network_address) - _NETWORK.num_addresses * _WORKER,
                                   _NETWORK.prefixlen)))
# The base rootfs takes ~60 s to debootstrap; keep it between runs.
CACHE = os.environ.get("PYMACHINE_TEST_CACHE", "/var/tmp/pymachine-test-cache")
BUSYBOX = shutil.which("busybox") or "/bin/busybox"

pytestmark = pytest.mark.integration


def machine_cli(home: Path, prefix: list[str] | None = None, **extra: str) -> Iterator[CLI]:
    """A CLI whose machines use the test bridge and image cache; every machine left at the end is removed."""
    env = {
        **os.environ,
        "PYMACHINE_HOME": str(home),
        "PYMACHINE_CACHE": CACHE,
        "PYMACHINE_LOCAL_BRIDGE": BRIDGE,
        "PYMACHINE_LOCAL_SUBNET": SUBNET,
        **extra,
    }
    env.pop("DOCKER_HOST", None)
    cli = CLI(env, prefix or [])
    try:
        yield cli
    finally:  # also when the caller's block fails: a context manager throws its error in at the yield
        names = cli("ls", "-q", check=False).stdout.split()
        if names:
            cli("rm", "-f", *names, check=False)


@pytest.fixture
def local(tmp_path: Path) -> Iterator[CLI]:
    yield from machine_cli(tmp_path / "home")


def busybox_image(directory: Path) -> Path:
    """A build context for an image made FROM scratch with a static busybox: there is no registry to pull from."""
    context = directory / "busybox-image"
    context.mkdir(exist_ok=True)
    shutil.copy(BUSYBOX, context / "busybox")
    (context / "Dockerfile").write_text('FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT ["/bin/busybox"]\n')
    return context


def docker_env(cli: CLI, machine: str) -> dict[str, str]:
    """The environment `eval $(pymachine env MACHINE)` gives a bash user."""
    exports = cli("env", "--shell", "bash", machine).stdout.splitlines()
    values = dict(line.removeprefix("export ").split("=", 1) for line in exports if line.startswith("export "))
    return cli.env | {key: value.strip('"') for key, value in values.items()}


def docker(cli: CLI, machine: str, *args: str) -> str:
    """The real docker CLI, pointed at the machine by `pymachine env` (and run where the CLI runs)."""
    proc = subprocess.run([*cli.prefix, "docker", *args], env=docker_env(cli, machine), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@pytest.fixture
def quick_roles(tmp_path: Path) -> Path:
    """A user's own copy of the roles (PYMACHINE_ROLES_PATH) that only records each run on the machine (with the
    engine role's variables, where the engine cache reads the packages a create prepares)."""
    for role in ROLES:
        tasks = tmp_path / "roles" / role / "tasks"
        tasks.mkdir(parents=True)
        (tasks / "main.yml").write_text(
            f"- name: record the run\n  ansible.builtin.shell: echo {role} >> /root/provisioned\n")
    for part in ("defaults", "vars"):
        shutil.copytree(roles_dir() / "engine" / part, tmp_path / "roles" / "engine" / part)
    return tmp_path / "roles"


FLEET = ("node1", "node2", "node3")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    """Three local machines with Docker (distro packages), created at once, for tests across machines (swarm,
    registry, compose): the CLI of their home; its machines are FLEET. Removed, with all they ran, at the end."""
    tmp = tmp_path_factory.mktemp("fleet")
    home = contextlib.contextmanager(machine_cli)(tmp / "home", DOCKER_CONFIG=str(tmp / "docker-config"),
                                                  DOCKER_BUILDKIT="0")
    with home as cli:
        cli("create", "--engine-install", "distro", *FLEET, timeout=1800)  # in parallel, one command
        yield cli


def libvirt_cli(tmp: Path, pool: str, image_url: tuple[str, str], **extra: str) -> Iterator[CLI]:
    """A CLI whose libvirt machines boot the test image from `pool`, reached through loopback ports, under TCG.

    The image cache is the CLI's own, so the download, its checksum and the cache are exercised for real.
    """
    url, sha256 = image_url
    yield from machine_cli(
        tmp / "home",
        PYMACHINE_CACHE=str(tmp / "cache"),
        PYMACHINE_LIBVIRT_POOL=pool,
        PYMACHINE_LIBVIRT_NETWORK="user",
        PYMACHINE_LIBVIRT_DOMAIN_TYPE="qemu",  # nested KVM is broken on the CI hosts
        PYMACHINE_LIBVIRT_IMAGE=url,
        PYMACHINE_LIBVIRT_IMAGE_SHA256=sha256,
        PYMACHINE_LIBVIRT_DISK_SIZE="4",
        **extra,
    )


def kill_create_at(cli: CLI, name: str, lines: int, *create_args: str) -> None:
    """Start `create ... NAME` and SIGKILL it once its journal has `lines` lines (or let it finish first)."""
    journal = cli.home / "machines" / name / "journal"
    proc = cli.popen("create", *create_args, name)
    while proc.poll() is None:
        try:
            if len(journal.read_text().splitlines()) >= lines:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def damage_record(cli: CLI, name: str, content: str | None) -> None:
    """Replace the machine's config.json with `content` (None: delete it), as a crash or a hand edit would."""
    config = cli.home / "machines" / name / "config.json"
    if content is None:
        config.unlink()
    else:
        config.write_text(content)


def journal_record(cli: CLI, name: str) -> dict:
    """What leftovers() needs (id and resources), replayed from the journal: config.json may be damaged."""
    record: dict = {"resources": {}}
    for line in (cli.home / "machines" / name / "journal").read_text().splitlines():
        entry = json.loads(line)
        if "identity" in entry:
            record["id"] = entry["identity"]["id"]
        else:
            record["resources"].update(entry["resources"])
    return record


def machine_record(cli: CLI, name: str) -> dict:
    return json.loads((cli.home / "machines" / name / "config.json").read_text())


def ssh_masters(machine_dir: Path) -> list[int]:
    """The ssh processes keeping a connection to the machine between commands (`ssh: CONTROL_PATH [mux]`)."""
    tag = f"/{sshmux.machine_prefix(machine_dir / 'known_hosts')}-".encode()
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and tag in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
    return found


def leftovers(record: dict, machine_dir: Path) -> list[str]:
    """Everything a removed machine could leave on the host; empty when it left nothing."""
    found = [f"ssh master {pid}" for pid in ssh_masters(machine_dir)]
    unit = f"pm-{record['id']}"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                if unit in cmdline or str(machine_dir) in cmdline:  # the machine's own, or one of its sshfs
                    found.append(f"process {proc.name}")
                if str(machine_dir) in (proc / "mountinfo").read_text():
                    found.append(f"mount in process {proc.name}")
            except OSError:
                pass
    if Path(f"/sys/class/net/vb-{unit}").exists():
        found.append(f"veth vb-{unit}")
    ip = record["resources"].get("ip")
    # A remembered MAC would make a new machine on the same address unreachable for up to a minute.
    if ip and subprocess.run(["ip", "neigh", "show", "to", ip, "dev", BRIDGE], capture_output=True).stdout:
        found.append(f"neighbour entry {ip}")
    for path in record["resources"].get("cgroups", []):
        if Path(path).exists():
            found.append(f"cgroup {path}")
    if machine_dir.exists():
        found.append(f"directory {machine_dir}")
    if record.get("driver") == "local":  # the marks that keep a shared base or engine layer from a prune
        for shared in filter(None, (record["resources"].get("base"), record["resources"].get("engine_layer"))):
            users = Path(shared).parent / "users"
            if users.is_dir() and any(_names(u, machine_dir) for u in users.iterdir()):
                found.append(f"mark in {users}")
    return found


def _names(mark: Path, machine_dir: Path) -> bool:
    """Whether `mark` names `machine_dir`; read without the marks' lock, so another worker's mark may be a
    temporary file renamed meanwhile."""
    try:
        return mark.read_text().strip() == str(machine_dir)
    except FileNotFoundError:
        return False


def bridge_leftovers() -> list[str]:
    found = []
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        found.append(f"bridge {BRIDGE}")
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    found += [f"rule {line}" for line in rules.splitlines() if re.search(f"pymachine:{BRIDGE}\\b", line)]
    if Path(f"/var/lib/pymachine/networks/{BRIDGE}.json").exists():
        found.append("lease file")
    return found


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[tuple[str, list[str]]]:
    """A quiet HTTP server for `directory` on 127.0.0.1: its base URL, and the paths requested so far."""
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def do_GET(self) -> None:
            requested.append(self.path)
            super().do_GET()

    with http_on_loopback(Handler) as url:
        yield url, requested


@pytest.fixture(scope="module")
def docker_repository(tmp_path_factory) -> Iterator[tuple[str, list[str]]]:
    """A stand-in for Docker's repository on 127.0.0.1 (tests/integration/docker_repo.py): (URL, paths asked)."""
    with serve_directory(docker_repo.build(tmp_path_factory.mktemp("docker-repo"))) as served:
        yield served


# -- a libvirtd for the libvirt modules, and the test image they boot ---------------------------------------
URI = "qemu:///system"


def _daemon_answers() -> bool:
    return virsh(URI, "version", check=False).returncode == 0


def hide_kvm(scratch: Path) -> str:
    """Shell lines that hide /dev/kvm in the mount namespace they run in (a libvirtd's, before it starts).

    The tests boot under TCG: nested KVM is broken on the CI hosts, and there /dev/kvm belongs to a group libvirt's
    QEMU user is not in. libvirt then finds its cached QEMU capabilities stale at every lookup and probes QEMU
    again, ~50 s for each domain defined. A daemon that sees no KVM at all caches its answer. (Its QEMUs get no
    private /dev, which libvirt would fill with the masked /dev/kvm's mount and fail to.)
    """
    mask, conf = scratch / "no-kvm", scratch / "qemu.conf"
    mask.touch(mode=0o600)
    return (f"if [ -e /dev/kvm ]; then\n"
            f"  cat /etc/libvirt/qemu.conf - > {conf} <<'EOF'\nnamespaces = []\nEOF\n"
            f"  mount --bind {conf} /etc/libvirt/qemu.conf\n"
            f"  mount --bind {mask} /dev/kvm\n"
            f"fi\n")


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory) -> Iterator[None]:
    """libvirtd and virtlogd for the session (reused when already running), stopped at the end."""
    require_libvirt()
    started = []
    if not _daemon_answers():
        run = tmp_path_factory.mktemp("libvirtd")
        Path("/run/libvirt").mkdir(exist_ok=True)
        started = [run / "virtlogd.pid", run / "libvirtd.pid"]
        script = "".join(f"{pidfile.stem} --daemon --pid-file={pidfile}\n" for pidfile in started)
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", hide_kvm(run) + script],
                       check=True, timeout=30)
        deadline = time.monotonic() + 30
        while not _daemon_answers():
            assert time.monotonic() < deadline, "libvirtd did not answer within 30 s"
            time.sleep(0.2)
    yield
    for pidfile in reversed(started):
        pid = int(pidfile.read_text())
        try:
            os.kill(pid, 15)
        except ProcessLookupError:  # it ended on its own (a crash): virtlogd must still be stopped
            continue
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)


@pytest.fixture(scope="session")
def image_url() -> Iterator[tuple[str, str]]:
    """(URL, sha256) of the test cloud image, served by a loopback HTTP server for the session."""
    image, digest = boot_image()
    with serve_directory(image.parent) as (base, _):
        yield f"{base}/{image.name}", digest
