"""A libvirt machine on a libvirt NAT network, found at its DHCP lease and followed when the lease moves.

Network policy: the network's bridge lives in a network namespace this run creates, served by a libvirtd of its
own started inside it (in a private mount namespace too, so that it shares no state with the host's libvirtd).
pymachine and the docker client run in that namespace: the guest's address is reachable from nowhere else, and
the namespace has no route out.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import CLI
from tests.integration.conftest import busybox_image, docker, docker_env, hide_kvm, machine_cli, machine_record
from tests.integration.libvirt_host import (
    BOOT_TIMEOUT,
    boot_image,
    domains,
    require_libvirt,
    run_namespace,
    scratch_pool,
    virsh,
    volumes,
)

pytestmark = pytest.mark.integration

NETWORK = "pmnet"
SUBNET = ipaddress.ip_network("10.231.241.0/24")  # inside the namespace only
RESERVED = "10.231.241.200"  # outside the DHCP range: where a reservation moves the machine

# libvirtd keeps its state under fixed paths; fresh ones hide the host daemon's domains, networks and sockets.
DAEMONS = """set -e
for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
    mkdir -p "$d"; mount -t tmpfs -o mode=0755 tmpfs "$d"
done
mount --bind "$1" /etc/libvirt
eval "$2"
virtlogd &
exec libvirtd
"""


@pytest.fixture(scope="module")
def netns_libvirt(tmp_path_factory) -> Iterator[tuple[str, list[str]]]:
    """(URI, command prefix) of a libvirtd running in a network namespace of its own, with a NAT network."""
    require_libvirt()
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare")
    root = tmp_path_factory.mktemp("netns-libvirtd")
    config, sockets = root / "etc", root / "sockets"
    sockets.mkdir()
    # The host's settings, none of its definitions.
    shutil.copytree("/etc/libvirt", config, ignore=shutil.ignore_patterns("qemu", "storage", "secrets", "nwfilter"))
    # The sockets outside the private mounts, so that clients in the namespace (or anywhere) can reach them.
    (config / "libvirtd.conf").write_text(f'unix_sock_dir = "{sockets}"\n')
    (root / "daemons.sh").write_text(DAEMONS)
    with run_namespace() as namespace, (root / "libvirtd.log").open("w") as log:
        subprocess.Popen(["ip", "netns", "exec", namespace, "unshare", "--mount", "--propagation", "private",
                          "sh", str(root / "daemons.sh"), str(config), hide_kvm(root)], stdout=log, stderr=log,
                         start_new_session=True)
        uri = f"qemu+unix:///system?socket={sockets}/libvirt-sock"
        deadline = time.monotonic() + 30
        while virsh(uri, "version", check=False).returncode != 0:
            assert time.monotonic() < deadline, f"libvirtd did not answer: {(root / 'libvirtd.log').read_text()}"
            time.sleep(0.2)
        gateway, first, last = SUBNET[1], SUBNET[10], SUBNET[100]
        (root / "network.xml").write_text(
            f"<network><name>{NETWORK}</name><forward mode='nat'/><bridge name='pmlvnet0' stp='off'/>"
            f"<ip address='{gateway}' netmask='{SUBNET.netmask}'><dhcp><range start='{first}' end='{last}'/>"
            f"</dhcp></ip></network>")
        virsh(uri, "net-create", str(root / "network.xml"))  # transient: gone with its libvirtd
        yield uri, ["ip", "netns", "exec", namespace]


@pytest.fixture(scope="module")
def pool(netns_libvirt) -> Iterator[str]:
    with scratch_pool(netns_libvirt[0]) as (name, _):
        yield name


@pytest.fixture(scope="module")
def cli(tmp_path_factory, netns_libvirt, pool) -> Iterator[CLI]:
    uri, prefix = netns_libvirt
    image, digest = boot_image()
    tmp = tmp_path_factory.mktemp("libvirt-network")
    yield from machine_cli(
        tmp / "home",
        prefix,
        PYMACHINE_CACHE=str(tmp / "cache"),
        PYMACHINE_LIBVIRT_URI=uri,
        PYMACHINE_LIBVIRT_POOL=pool,
        PYMACHINE_LIBVIRT_NETWORK=NETWORK,
        PYMACHINE_LIBVIRT_DOMAIN_TYPE="qemu",  # nested KVM is broken on the CI hosts
        PYMACHINE_LIBVIRT_IMAGE=str(image),  # a local path this time (the other module downloads a URL)
        PYMACHINE_LIBVIRT_IMAGE_SHA256=digest,
        PYMACHINE_LIBVIRT_MEMORY="1024",
        PYMACHINE_LIBVIRT_DISK_SIZE="4",
        DOCKER_CONFIG=str(tmp / "docker-config"),
        DOCKER_BUILDKIT="0",
    )


@pytest.fixture(scope="module")
def vm(cli) -> str:
    # Run by `ip netns exec`, whose /sys has no cgroup hierarchy for the engine layer's build container.
    cli("create", "--driver", "libvirt", "--engine-install", "distro", "--no-libvirt-engine-layer", "net1",
        timeout=900)
    return "net1"


def _leases(uri: str) -> str:
    return virsh(uri, "net-dhcp-leases", NETWORK).stdout


def test_the_machine_lives_at_its_dhcp_lease(cli, netns_libvirt, vm, tmp_path):
    uri = netns_libvirt[0]
    address = cli("ip", vm).stdout.strip()
    assert ipaddress.ip_address(address) in SUBNET
    mac = machine_record(cli, vm)["resources"]["mac"]
    assert any(mac in line and f"{address}/" in line for line in _leases(uri).splitlines())
    assert cli("ssh", vm, "--", "hostname").stdout.strip() == vm
    # The engine's certificate names the lease, and the docker CLI reaches it there over mutual TLS.
    assert docker_env(cli, vm)["DOCKER_HOST"] == f"tcp://{address}:2376"
    docker(cli, vm, "build", "-q", "-t", "pm-busybox", str(busybox_image(tmp_path)))
    assert docker(cli, vm, "run", "--rm", "pm-busybox", "echo", "hello from a lease").strip() == "hello from a lease"


def test_start_follows_a_moved_lease_and_offers_new_certificates(cli, netns_libvirt, vm):
    uri = netns_libvirt[0]
    old = cli("ip", vm).stdout.strip()
    mac = machine_record(cli, vm)["resources"]["mac"]
    # Killed, the guest cannot release its lease: the old one is still there when the machine starts again.
    cli("kill", vm)
    assert f"{old}/" in _leases(uri)
    virsh(uri, "net-update", NETWORK, "add", "ip-dhcp-host", f"<host mac='{mac}' ip='{RESERVED}'/>", "--live")
    proc = cli("start", vm, timeout=BOOT_TIMEOUT)
    assert cli("ip", vm).stdout.strip() == RESERVED
    assert cli("ssh", vm, "--", "hostname").stdout.strip() == vm
    assert f"came back at {RESERVED}" in proc.stderr and f"pymachine regenerate-certs {vm}" in proc.stderr
    refused = cli("env", vm, check=False)
    assert refused.returncode == 1 and "does not name its address" in refused.stderr
    cli("regenerate-certs", vm, timeout=600)
    assert docker_env(cli, vm)["DOCKER_HOST"] == f"tcp://{RESERVED}:2376"
    assert docker(cli, vm, "run", "--rm", "pm-busybox", "echo", "moved").strip() == "moved"


def test_rm_leaves_nothing_in_libvirt(cli, netns_libvirt, pool, vm):
    uri = netns_libvirt[0]
    r = machine_record(cli, vm)["resources"]
    cli("rm", "-y", vm)
    assert vm not in domains(uri)
    assert r["disk"] not in volumes(uri, pool) and r["seed"] not in volumes(uri, pool)
    assert not (cli.home / "machines" / vm).exists()
    # The base image stays in the pool for the next machine, as it does on the host's libvirtd.
    assert [v for v in volumes(uri, pool) if v.startswith("pymachine-base-")]
