"""Option checks and the lifecycle against libvirt's test:///default driver (no daemon, no QEMU)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import socket
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

import machine.drivers.libvirt as libvirt_driver
from machine import drivers, sshkeys
from machine.commands.machines import parse_driver_options, rm
from machine.commands.queries import url
from machine.drivers.base import State
from machine.drivers.libvirt import LibvirtDriver, catalog, domain, network, storage
from machine.errors import MachineError, UsageError
from machine.store import Store
from tests.conftest import http_on_loopback

libvirt = pytest.importorskip("libvirt")


CAPS = """<capabilities><host/>
  <guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/><domain type='kvm'/></arch></guest>
  <guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/>{kvm}</arch></guest>
</capabilities>"""


class FakeConn:
    def __init__(self, kvm: bool) -> None:
        self.caps = CAPS.format(kvm="<domain type='kvm'/>" if kvm else "")

    def getCapabilities(self) -> str:
        return self.caps

    def getURI(self) -> str:
        return "qemu:///system"


@pytest.fixture(autouse=True)
def test_driver_runs_qemu(monkeypatch):
    """libvirt's test driver offers only its own `test` domain type: answer as a QEMU host without KVM."""
    real = libvirt_driver.resolve_domain_type
    monkeypatch.setattr(libvirt_driver, "resolve_domain_type", lambda conn, wanted: real(FakeConn(False), wanted))


def options(**overrides: str) -> dict:
    raw = {"libvirt_uri": "test:///default", "libvirt_pool": "default-pool", "libvirt_network": "default"}
    return parse_driver_options("libvirt", raw | overrides)


def test_registered():
    assert drivers.get("libvirt") is LibvirtDriver


@pytest.mark.parametrize(("overrides", "error", "text"), [
    ({"libvirt_uri": "nosuch:///x"}, MachineError, "cannot connect to libvirt at nosuch:///x"),
    ({"libvirt_network": "missing"}, MachineError, "libvirt has no network 'missing'"),
    ({"libvirt_pool": "missing"}, MachineError, "libvirt has no storage pool 'missing'"),
    ({"libvirt_cpus": "0"}, UsageError, "--libvirt-cpus: 0 is less than 1"),
    ({"libvirt_memory": "100"}, UsageError, "--libvirt-memory: 100 is less than 256 MiB"),
    ({"libvirt_disk_size": "0"}, UsageError, "--libvirt-disk-size: 0 is less than 1 GiB"),
    ({"libvirt_image": "debian-12", "libvirt_image_sha256": "a" * 64}, UsageError, "not to an alias"),
    ({"libvirt_image": "/no/such/image.qcow2"}, UsageError, "is not a file"),
    ({"libvirt_uri": "qemu+ssh://host/system", "libvirt_network": "user"}, UsageError, "is remote"),
    ({"libvirt_domain_type": "kvm"}, MachineError, "cannot run kvm x86_64 guests"),
])
def test_pre_create_check_refuses(overrides, error, text):
    with pytest.raises(error, match=text.replace("(", r"\(").replace("+", r"\+")):
        LibvirtDriver.pre_create_check(options(**overrides))


def test_pre_create_check_accepts_a_good_request():
    LibvirtDriver.pre_create_check(options(libvirt_domain_type="qemu", libvirt_image="ubuntu-24.04"))


def test_domain_type_auto_prefers_kvm_and_falls_back_to_qemu(monkeypatch):
    monkeypatch.undo()
    resolve = libvirt_driver.resolve_domain_type
    assert domain.hvm_types(FakeConn(True).caps) == {"qemu", "kvm"}
    assert resolve(FakeConn(True), "auto") == "kvm"
    assert resolve(FakeConn(False), "auto") == "qemu"
    assert resolve(FakeConn(True), "qemu") == "qemu"
    with pytest.raises(MachineError, match="cannot run kvm x86_64 guests"):
        resolve(FakeConn(False), "kvm")


def test_aliases_pin_official_images():
    for image in catalog.IMAGES.values():
        assert image.url.startswith("https://") and (image.sha256 or image.sha512)
    assert catalog.resolve(None, None) is catalog.IMAGES[catalog.DEFAULT]


def test_image_info(tmp_path):
    qcow = tmp_path / "a.qcow2"
    qcow.write_bytes(b"QFI\xfb" + bytes(20) + (5 << 30).to_bytes(8, "big") + bytes(100))
    assert storage.image_info(qcow) == ("qcow2", 5 << 30)
    raw = tmp_path / "a.raw"
    raw.write_bytes(bytes(4096))
    assert storage.image_info(raw) == ("raw", 4096)


def test_free_ports_differ_and_are_free():
    ports = network.free_ports(2)
    assert len(set(ports)) == 2 and all(network.port_free(p) for p in ports)


def test_remove_of_a_machine_that_made_nothing_is_a_no_op(tmp_path):
    store = Store(tmp_path)
    with store.reserve("web", "libvirt", options()) as machine:
        driver = LibvirtDriver(machine, store)
        driver.remove()
        assert driver.state().value == "Stopped"
        assert driver.leftovers() == []


def test_a_machine_whose_libvirt_host_is_gone_is_kept_by_rm_f_and_dropped_by_rm_forget(tmp_path, capsys):
    # Nothing can say whether its domain and volumes are gone: `rm -f` keeps the record, `rm --forget` drops it
    # and prints what it recorded, for the user to look after.
    store = Store(tmp_path)
    gone = options(libvirt_uri="qemu+tcp://127.0.0.1:1/system")  # nothing listens on port 1
    with store.reserve("web", "libvirt", gone) as machine:
        machine.record(domain="pm-web", pool="default")
    with pytest.raises(MachineError, match=r"left: unknown \(cannot connect .*`pymachine rm --forget web`"):
        rm(store, "web", force=True)
    assert store.exists("web")
    rm(store, "web", forget=True)
    assert not store.exists("web")
    warning = capsys.readouterr().err.strip()
    assert warning.startswith("pymachine: warning: web forgotten; left: unknown (cannot connect to libvirt at "
                              "qemu+tcp://127.0.0.1:1/system")
    assert warning.endswith('; it recorded {"domain": "pm-web", "pool": "default"}')


@contextlib.contextmanager
def serving(body: bytes) -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server that answers every GET with `body`: its image URL, and the paths requested."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with http_on_loopback(Handler) as url:
        yield f"{url}/image.qcow2", requests


def test_parallel_creates_download_an_image_once(tmp_path):
    """Machines created together wait for one download (under the cache lock) and share its file."""
    body = b"qcow2 image " * 100_000
    with serving(body) as (url, requests):
        image = catalog.resolve(url, hashlib.sha256(body).hexdigest())
        with ThreadPoolExecutor(4) as pool:
            paths = list(pool.map(lambda _: catalog.fetch(image, tmp_path / "cache"), range(4)))
    assert requests == ["/image.qcow2"]
    assert len(set(paths)) == 1 and paths[0].read_bytes() == body


def test_an_image_pinned_by_sha512_is_verified_once_then_served_from_the_cache(tmp_path):
    """Debian publishes only SHA512SUMS: its aliases are pinned by sha512."""
    body = b"debian cloud image " * 50_000
    cache = tmp_path / "cache"
    with serving(body) as (url, requests):
        wrong = catalog.CloudImage(url, sha512="0" * 128)
        with pytest.raises(MachineError, match="checksum mismatch"):
            catalog.fetch(wrong, cache)
        assert [p for p in cache.iterdir() if not p.name.startswith(".")] == []
        image = catalog.CloudImage(url, sha512=hashlib.sha512(body).hexdigest())
        first = catalog.fetch(image, cache)
        assert catalog.fetch(image, cache) == first and first.read_bytes() == body
    assert requests == ["/image.qcow2", "/image.qcow2"]  # the mismatch, then one verified download


def test_start_keeps_free_forwarded_ports_and_replaces_taken_ones(defined, monkeypatch):
    machine = defined.machine
    defined.kill()
    ssh_port, engine_port = machine.resources["ssh_port"], machine.resources["engine_port"]
    redefined = []
    monkeypatch.setattr(defined, "_boot", lambda: None)
    monkeypatch.setattr(defined, "_define", lambda: redefined.append(True))
    defined.start()
    assert (machine.resources["ssh_port"], machine.resources["engine_port"]) == (ssh_port, engine_port)
    assert not redefined
    with socket.socket() as squatter:
        squatter.bind((network.LOOPBACK, engine_port))
        defined.start()
    assert engine_port not in (machine.resources["ssh_port"], machine.resources["engine_port"])
    assert redefined == [True]


def test_a_boot_that_never_reaches_ssh_names_the_consoles_last_line(tmp_path):
    log = tmp_path / "console.log"
    assert libvirt_driver.console_tail(log) == f"the guest wrote no console log ({log})"
    log.write_bytes(b"\r\n \r\n")
    assert libvirt_driver.console_tail(log) == f"the guest's console stayed silent ({log})"
    log.write_bytes(b"[    1.0] Run /init\r\n[\x1b[0;32m  OK  \x1b[0m] Reached target \x1b[1mNetwork\x1b[0m.\r\n\r\n")
    assert libvirt_driver.console_tail(log) == f"the guest's console last said '[  OK  ] Reached target Network.' " \
                                               f"(all of it: {log})"


def test_the_guest_address_is_its_newest_ipv4_lease():
    class Net:
        def DHCPLeases(self, mac: str) -> list[dict]:
            assert mac == "52:54:00:ab:cd:ef"
            return [{"type": 0, "ipaddr": "192.168.122.10", "expirytime": 100},
                    {"type": 1, "ipaddr": "fd00::10", "expirytime": 300},
                    {"type": 0, "ipaddr": "192.168.122.11", "expirytime": 200}]

    assert network.lease(Net(), "52:54:00:ab:cd:ef") == "192.168.122.11"


def test_after_a_boot_only_a_lease_granted_or_renewed_since_counts():
    held = {"52:54:00:ab:cd:ef": [{"type": 0, "ipaddr": "192.168.122.10", "expirytime": 100}]}

    class Net:
        def DHCPLeases(self, mac: str) -> list[dict]:
            return held[mac]

    net, mac = Net(), "52:54:00:ab:cd:ef"
    stale = network.leases(net, mac)  # a killed guest never released its lease
    assert network.lease(net, mac, stale) is None
    held[mac].append({"type": 0, "ipaddr": "192.168.122.20", "expirytime": 4000})  # a reservation moved it
    assert network.lease(net, mac, stale) == "192.168.122.20"
    held[mac] = [{"type": 0, "ipaddr": "192.168.122.10", "expirytime": 0}]  # never expires, never moves
    assert network.lease(net, mac, network.leases(net, mac)) == "192.168.122.10"


def test_a_torn_sha512_marker_is_verified_again_not_trusted(tmp_path):
    body = b"debian cloud image " * 50_000
    cache = tmp_path / "cache"
    with serving(body) as (url, requests):
        image = catalog.CloudImage(url, sha512=hashlib.sha512(body).hexdigest())
        first = catalog.fetch(image, cache)
        marker = cache / f"sha512-{image.sha512[:32]}"
        marker.write_text(first.name[:20])  # what a crash in the middle of a non-atomic write left
        assert catalog.fetch(image, cache) == first
    assert requests == ["/image.qcow2", "/image.qcow2"]
    assert marker.read_text().strip() == first.name


@pytest.fixture
def defined(tmp_path) -> Iterator[LibvirtDriver]:
    """A machine whose domain is defined and running in libvirt's test driver (its `test` domain type: no QEMU)."""
    store = Store(tmp_path)
    with store.reserve("web", "libvirt", options(libvirt_network="user")) as machine:
        pass
    driver = LibvirtDriver(machine, store)
    ssh_port, engine_port = network.free_ports(2)
    machine.record(pool="default-pool", domain_type="test", mac=network.new_mac(), disk=driver._disk_name,
                   seed=driver._seed_name, ssh_port=ssh_port, engine_port=engine_port, uuid=str(uuid.uuid4()),
                   host_key=sshkeys.new_keypair("root@web").public_line)
    driver._define()
    driver._domain().create()
    yield driver
    with contextlib.suppress(libvirt.libvirtError):  # the test driver's state lives as long as the process
        dom = driver.conn.lookupByUUIDString(machine.resources["uuid"])
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def test_stop_of_a_domain_undefined_behind_pymachines_back(defined):
    # `virsh undefine` of a running domain leaves it transient: it vanishes as it stops, under stop's feet
    # (stop said "internal error: libvirtError: Domain not found").
    defined._domain().undefine()
    defined.stop(timeout=5)
    assert defined._domain() is None


def test_start_defines_again_a_domain_undefined_behind_pymachines_back(defined, monkeypatch):
    store, name, uuid_string = defined.store, defined.machine.name, defined.machine.resources["uuid"]
    dom = defined._domain()
    dom.destroy()
    dom.undefine()
    # Commands that need it running say what happened and what brings it back (not "start it", which failed).
    with pytest.raises(MachineError, match=r"the domain of web is gone from libvirt \(`pymachine start web` "
                                           r"defines it again over its disk\)"):
        url(store, name)
    monkeypatch.setattr(network, "wait_for_ssh", lambda *args: None)  # the test driver runs no guest
    defined.start()  # was: "the domain of web is gone from libvirt (remove the machine)"
    assert defined._domain().UUIDString() == uuid_string
    assert defined.state() == State.RUNNING


def test_a_machine_whose_libvirtd_is_unreachable_says_so_not_that_it_is_stopped(tmp_path):
    store = Store(tmp_path)
    with store.reserve("web", "libvirt", options(libvirt_uri="qemu+tcp://127.0.0.1:1/system")) as machine:
        machine.record(uuid=str(uuid.uuid4()))
    # It may well run: libvirtd was restarted, or stopped a while (was: "not running (start it with ...)").
    with pytest.raises(MachineError, match=r"^cannot connect to libvirt at qemu\+tcp://127.0.0.1:1/system: "):
        url(store, "web")
