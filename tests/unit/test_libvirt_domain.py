"""Domain XML, ownership metadata and state, checked against libvirt's test:///default driver."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET

import pytest

from machine.drivers.base import State
from machine.drivers.libvirt import domain

libvirt = pytest.importorskip("libvirt")

SPEC = domain.DomainSpec(
    name="web", uuid="6f2c3f9e-8a1b-4c6d-9e0f-1a2b3c4d5e6f", machine_id="0123abcd", home="/home/a&b'<c>",
    domain_type="qemu", cpus=2, memory=1536, pool="default", disk="web-0123abcd.qcow2",
    seed="web-0123abcd-seed.iso", network="user", mac="52:54:00:ab:cd:ef", console_log="/m/console.log",
    ssh_port=40022, engine_port=40376,
)
QEMU = "{http://libvirt.org/schemas/domain/qemu/1.0}"


@pytest.fixture
def conn():
    from machine.drivers.libvirt.connection import connect

    c = connect("test:///default")
    yield c
    c.close()


def test_user_networking_forwards_ssh_and_engine_from_loopback_only():
    root = ET.fromstring(domain.render(SPEC))
    assert root.get("type") == "qemu" and root.findtext("name") == "web"
    assert root.find("memory").text == "1536" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("vcpu") == "2"
    assert root.find("devices/interface") is None
    args = [a.get("value") for a in root.iter(QEMU + "arg")]
    assert args[0] == "-netdev" and args[2] == "-device"
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in args[1] and "hostfwd=tcp:127.0.0.1:40376-:2376" in args[1]
    assert "mac=52:54:00:ab:cd:ef" in args[3]
    assert root.find("cpu") is None  # TCG: QEMU's default model
    assert root.find("devices/controller[@type='usb']").get("model") == "none"  # no emulated USB to slow TCG


def test_disks_are_virtio_and_the_seed_is_read_only():
    disks = ET.fromstring(domain.render(SPEC)).findall("devices/disk")
    assert [(d.find("target").get("bus"), d.find("source").get("volume")) for d in disks] == [
        ("virtio", "web-0123abcd.qcow2"), ("virtio", "web-0123abcd-seed.iso")]
    assert disks[0].find("readonly") is None and disks[1].find("readonly") is not None


def test_libvirt_network_and_kvm():
    spec = dataclasses.replace(SPEC, network="default", domain_type="kvm", ssh_port=0, engine_port=0)
    root = ET.fromstring(domain.render(spec))
    iface = root.find("devices/interface")
    assert iface.get("type") == "network" and iface.find("source").get("network") == "default"
    assert iface.find("mac").get("address") == "52:54:00:ab:cd:ef"
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert root.find(QEMU + "commandline") is None


def test_defined_domain_carries_our_metadata(conn):
    dom = conn.defineXML(domain.render(SPEC))
    try:
        assert domain.owner(dom) == domain.Owner("0123abcd", "/home/a&b'<c>")
        assert domain.state(dom) == State.STOPPED
        dom.create()
        assert domain.state(dom) == State.RUNNING
        dom.destroy()
    finally:
        dom.undefine()


def test_a_foreign_domain_has_no_owner(conn):
    foreign = conn.lookupByName("test")  # the test driver's own domain
    assert domain.owner(foreign) is None
