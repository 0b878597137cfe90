"""The libvirt driver end to end: a real libvirtd, QEMU (TCG), a cloud image served over loopback HTTP.

The guest is reached only through ports QEMU forwards from 127.0.0.1 (`--libvirt-network user`): no bridge,
no traffic to any other address. One VM is shared by the lifecycle tests (a TCG boot takes ~80 s).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine.drivers.libvirt import storage
from machine.store import file_lock
from tests.conftest import CLI
from tests.integration.conftest import URI, busybox_image, docker, docker_env, libvirt_cli, machine_record
from tests.integration.libvirt_host import BOOT_TIMEOUT, domains, scratch_pool, virsh, volumes

pytestmark = pytest.mark.integration

@pytest.fixture(scope="session")
def pool(libvirtd) -> Iterator[str]:
    with scratch_pool(URI) as (name, _):
        yield name


@pytest.fixture(scope="module")
def cli(tmp_path_factory, pool, image_url) -> Iterator[CLI]:
    tmp = tmp_path_factory.mktemp("libvirt")
    yield from libvirt_cli(tmp, pool, image_url, PYMACHINE_LIBVIRT_MEMORY="1024",
                           DOCKER_CONFIG=str(tmp / "docker-config"), DOCKER_BUILDKIT="0")










def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def assert_nothing_left(cli: CLI, pool: str, name: str) -> None:
    assert name not in domains(URI)
    assert not [v for v in volumes(URI, pool) if v.startswith(f"{name}-")]
    assert not (cli.home / "machines" / name).exists()


# -- bad input: one clear line, nothing half-made -------------------------------------------------------------
def test_checksum_mismatch_keeps_nothing(cli, pool, image_url):
    proc = cli("create", "--driver", "libvirt", "--no-provision", "--libvirt-image-sha256", "0" * 64, "bad-sum",
               check=False)
    assert proc.returncode == 1
    assert "checksum mismatch" in error_line(proc)
    cache = Path(cli.env["PYMACHINE_CACHE"]) / "libvirt"
    assert [p.name for p in cache.iterdir() if not p.name.startswith(".")] == []
    assert not list(cache.glob(".download.*"))
    assert_nothing_left(cli, pool, "bad-sum")


@pytest.mark.parametrize(("flags", "expected"), [
    (["--libvirt-uri", "nosuch:///system"], "cannot connect to libvirt at nosuch:///system"),
    (["--libvirt-uri", "qemu+unix:///system?socket=/nonexistent/sock"], "cannot connect to libvirt"),
    (["--libvirt-network", "pm-no-such-net"], "libvirt has no network 'pm-no-such-net'"),
    (["--libvirt-pool", "pm-no-such-pool"], "libvirt has no storage pool 'pm-no-such-pool'"),
    (["--libvirt-memory", str(1 << 30)], "MiB available"),
    (["--libvirt-memory", "64"], "--libvirt-memory: 64 is less than 256 MiB"),
    (["--libvirt-domain-type", "xen"], "--libvirt-domain-type"),
])
def test_bad_input_is_refused_before_anything_is_made(cli, pool, flags, expected):
    proc = cli("create", "--driver", "libvirt", "--no-provision", *flags, "refused", check=False)
    assert proc.returncode in (1, 2)
    assert expected in error_line(proc)
    assert_nothing_left(cli, pool, "refused")


def test_a_foreign_domain_name_is_refused_and_left_alone(cli, pool, tmp_path):
    xml = tmp_path / "foreign.xml"
    xml.write_text("<domain type='qemu'><name>foreign</name><memory unit='MiB'>64</memory>"
                   "<os><type arch='x86_64'>hvm</type></os></domain>")
    virsh(URI, "define", str(xml))
    try:
        proc = cli("create", "--driver", "libvirt", "--no-provision", "foreign", check=False)
        assert proc.returncode == 1
        assert "already has a domain named 'foreign' that pymachine did not create" in error_line(proc)
        assert "foreign" in domains(URI)  # untouched
        assert not [v for v in volumes(URI, pool) if v.startswith("foreign-")]
        assert not (cli.home / "machines" / "foreign").exists()
    finally:
        virsh(URI, "undefine", "foreign", check=False)


# -- one real machine through its whole life ------------------------------------------------------------------
@pytest.fixture(scope="module")
def vm(cli) -> str:
    cli("create", "--driver", "libvirt", "--engine-install", "distro", "vm1", timeout=900)
    return "vm1"


def test_create_boots_from_the_cloud_image_and_runs_containers(cli, pool, vm, tmp_path):
    record = machine_record(cli, vm)
    r = record["resources"]
    assert record["state"] == "ready" and r["domain_type"] == "qemu"
    assert cli("status", vm).stdout.strip() == "Running"
    assert cli("ip", vm).stdout.strip() == "127.0.0.1"
    assert cli("ssh", vm, "--", "hostname").stdout.strip() == vm
    # cloud-init grew the root filesystem to the requested 4 GiB.
    size = int(cli("ssh", vm, "--", "df -B1M --output=size /").stdout.split()[-1])
    assert size > 3000
    # The disk is an overlay over the engine's packages (the engine cache), an overlay over the shared base
    # volume in the pool; the seed is a virtio disk.
    disk_xml = virsh(URI, "vol-dumpxml", "--pool", pool, r["disk"]).stdout
    assert "<backingStore>" in disk_xml and f"/{r['engine_layer']}</path>" in disk_xml
    assert r["engine_layer"].startswith("pymachine-engine-") and r["engine_layer"] in volumes(URI, pool)
    layer_xml = virsh(URI, "vol-dumpxml", "--pool", pool, r["engine_layer"]).stdout
    assert "<backingStore>" in layer_xml and "pymachine-base-" in layer_xml
    assert "<compat>1.1</compat>" in disk_xml  # zeroes the guest writes stay holes
    # The guest sees what the layer holds: apt's lists as refreshed by the layer's build, so fresh that the engine
    # role did not refresh them again (it would have touched the stamp at provisioning).
    stamp = "var/lib/apt/periodic/update-success-stamp"
    [built] = [p for p in (Path(cli.env["PYMACHINE_CACHE"]) / "libvirt/engine-layers").glob(f"*/*/rootfs/{stamp}")
               if f"-{p.parents[5].name}.qcow2" in r["engine_layer"]]
    assert int(cli("ssh", vm, "--", f"stat -c %Y /{stamp}").stdout) == int(built.stat().st_mtime)
    # The cached layer still names the cached image as its backing file (only the pool's copy names the volume).
    cached = subprocess.run(["qemu-img", "info", "--output=json", str(built.parents[5] / "disk.qcow2")],
                            capture_output=True, text=True, check=True).stdout
    assert json.loads(cached)["backing-filename"] == str(
        Path(cli.env["PYMACHINE_CACHE"]) / "libvirt" / cli.env["PYMACHINE_LIBVIRT_IMAGE_SHA256"])
    assert r["seed"] in volumes(URI, pool)
    assert f"<pm:id>{record['id']}</pm:id>" in virsh(URI, "dumpxml", vm).stdout
    # The image came through the cache, named by its checksum.
    assert (Path(cli.env["PYMACHINE_CACHE"]) / "libvirt" / cli.env["PYMACHINE_LIBVIRT_IMAGE_SHA256"]).is_file()

    assert docker_env(cli, vm)["DOCKER_HOST"] == f"tcp://127.0.0.1:{r['engine_port']}"
    docker(cli, vm, "build", "-q", "-t", "pm-busybox", str(busybox_image(tmp_path)))
    assert docker(cli, vm, "run", "--rm", "pm-busybox", "echo", "hello from libvirt").strip() == "hello from libvirt"


def prune(cli: CLI, *flags: str) -> list[str]:
    """What `cache prune` removed or would: each line's phrase, its size left out."""
    lines = cli("cache", "prune", *flags).stdout.splitlines()
    return [line.rsplit(" (", 1)[0] for line in lines if line.startswith(("removed ", "would remove "))]


def test_cache_prune_never_takes_what_a_disk_is_backed_by(cli, pool, vm):
    r = machine_record(cli, vm)["resources"]
    base = next(v for v in volumes(URI, pool) if v.startswith("pymachine-base-"))
    # Everything the next create would use goes with --all, but not the volumes vm1's disk is backed by.
    would = prune(cli, "--all", "--dry-run")
    assert [line for line in would if r["engine_layer"] in line or base in line] == [], would
    assert any(line.endswith("(libvirt)") for line in would), would  # the cached layer: the pool has its copy


def test_stop_is_a_clean_shutdown_and_start_moves_ports_someone_took(cli, vm):
    old = machine_record(cli, vm)["resources"]
    cli("stop", vm, timeout=300)
    assert cli("status", vm).stdout.strip() == "Stopped"
    # The guest powered itself off on the ACPI button (stop forces it only after a timeout).
    assert "reboot: Power down" in (cli.home / "machines" / vm / "console.log").read_text(errors="replace")
    # One boot for both paths of start: its forwarded ports are kept when free (a unit test checks that),
    # and moved when something took one while the machine was off.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", old["ssh_port"]))
        squatter.listen()
        cli("start", vm, timeout=BOOT_TIMEOUT)
    assert cli("status", vm).stdout.strip() == "Running"
    new = machine_record(cli, vm)["resources"]
    assert new["ssh_port"] != old["ssh_port"]
    # Still 127.0.0.1, which the engine's certificate names: the URL changes, the certificate need not, and
    # `start` returned only once the engine answered.
    assert cli("url", vm).stdout.strip() == f"tcp://127.0.0.1:{new['engine_port']}"
    assert cli("ssh", vm, "--", "hostname").stdout.strip() == vm
    assert docker(cli, vm, "version", "--format", "{{.Server.Os}}").strip() == "linux"


def test_kill_then_rm_leaves_nothing(cli, pool, vm):
    cli("kill", vm)
    assert cli("status", vm).stdout.strip() == "Stopped"
    r = machine_record(cli, vm)["resources"]
    pool_dir = Path(virsh(URI, "pool-dumpxml", pool).stdout.split("<path>")[1].split("</path>")[0])
    cli("rm", "-y", vm)
    assert_nothing_left(cli, pool, vm)
    assert r["uuid"] not in virsh(URI, "list", "--all", "--uuid").stdout
    assert r["disk"] not in volumes(URI, pool) and r["seed"] not in volumes(URI, pool)
    assert not (pool_dir / r["disk"]).exists() and not (pool_dir / r["seed"]).exists()
    assert r["engine_layer"] in volumes(URI, pool)  # shared: the next machine with this engine is made from it


def test_cache_prune_removes_the_volumes_no_disk_is_backed_by(cli, pool):
    # vm1 is gone (the test above): its engine layer's volume and the image's copy stay for the next create.
    cache = Path(cli.env["PYMACHINE_CACHE"]) / "libvirt"
    [generation] = [g for g in cache.glob("engine-layers/*/*") if g.is_dir()]
    layer = storage.layer_volume_name(generation)
    base = next(v for v in volumes(URI, pool) if v.startswith("pymachine-base-"))
    assert layer in volumes(URI, pool)
    assert not [line for line in prune(cli) if layer in line or base in line]  # current: kept
    assert layer in volumes(URI, pool) and generation.is_dir()

    expected = {f"engine layer {generation.parent.name}/{generation.name} (libvirt)", f"volume {pool}/{layer}",
                f"volume {pool}/{base}"}
    assert expected <= {line.removeprefix("would remove ") for line in prune(cli, "--all", "--dry-run")}
    assert layer in volumes(URI, pool) and generation.is_dir()
    # A create between its upload and its disk holds the cache (shared): the prune waits for it.
    with file_lock(cache / "prune.lock", timeout=5, what="the test's create", shared=True):
        waiting = cli.popen("cache", "prune", "--all")
        time.sleep(3)
        assert waiting.poll() is None and layer in volumes(URI, pool) and generation.is_dir()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert expected <= {line.removeprefix("removed ").rsplit(" (", 1)[0] for line in out.splitlines()}, out
    assert layer not in volumes(URI, pool) and base not in volumes(URI, pool) and not generation.exists()
    assert prune(cli, "--all") == []
