"""The domain definition (from templates/libvirt/domain.xml.j2), who owns a domain, and its state."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from machine import templating
from machine.drivers.base import State
from machine.drivers.libvirt.connection import is_missing, libvirt_module, message
from machine.errors import MachineError
from machine.paths import data_dir

if TYPE_CHECKING:
    import libvirt
    from jinja2 import Environment

TEMPLATES = data_dir("templates") / "libvirt"
# Marks the domains pymachine defined, so that it never touches (or removes) one it did not create.
NAMESPACE = "https://pymachine.dev/xmlns/libvirt/machine/1"


def templates() -> Environment:
    return templating.environment(TEMPLATES, xml=True, trim_blocks=True, lstrip_blocks=True)


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    machine_id: str
    home: str
    domain_type: str  # kvm | qemu
    cpus: int
    memory: int  # MiB
    pool: str
    disk: str  # volume names in the pool
    seed: str
    network: str  # a libvirt network name, or "user"
    mac: str
    console_log: str
    ssh_port: int = 0  # user networking: loopback ports forwarded to the guest's 22 and 2376
    engine_port: int = 0


def render(spec: DomainSpec) -> str:
    return templates().get_template("domain.xml.j2").render(namespace=NAMESPACE, **asdict(spec))


@dataclass(frozen=True)
class Owner:
    machine_id: str
    home: str


def owner(dom: libvirt.virDomain) -> Owner | None:
    """The pymachine machine a domain belongs to, or None for a domain pymachine did not create."""
    lv = libvirt_module()
    try:
        text = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, NAMESPACE)
    except lv.libvirtError:
        return None  # no element in our namespace
    root = ET.fromstring(text)
    return Owner(_find(root, "id"), _find(root, "home"))


def _find(root: ET.Element, tag: str) -> str:
    # libvirt hands the element back with its namespace bound to a prefix of its choosing.
    for child in root:
        if child.tag.rsplit("}", 1)[-1] == tag:
            return child.text or ""
    return ""


def hvm_types(capabilities: str, arch: str = "x86_64") -> set[str]:
    """The domain types (kvm, qemu, …) libvirt's capabilities XML offers for full virtualisation of `arch`."""
    return {d.get("type", "") for guest in ET.fromstring(capabilities).iter("guest")
            if guest.findtext("os_type") == "hvm" and guest.find(f"arch[@name='{arch}']") is not None
            for d in guest.iterfind(f"arch[@name='{arch}']/domain")}


def is_active(dom: libvirt.virDomain) -> bool:
    """Whether the domain runs; False once it is gone (undefined behind pymachine's back, a domain is transient
    and vanishes as it stops)."""
    lv = libvirt_module()
    try:
        return bool(dom.isActive())
    except lv.libvirtError as e:
        if is_missing(e):
            return False
        raise MachineError(f"domain {dom.name()}: {message(e)}") from None


def state(dom: libvirt.virDomain) -> State:
    lv = libvirt_module()
    code = dom.state()[0]
    if code in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_BLOCKED, lv.VIR_DOMAIN_SHUTDOWN):
        return State.RUNNING  # SHUTDOWN: still running while the guest powers off
    if code in (lv.VIR_DOMAIN_SHUTOFF, lv.VIR_DOMAIN_PAUSED, lv.VIR_DOMAIN_PMSUSPENDED):
        return State.STOPPED
    return State.ERROR  # crashed, or a state libvirt does not know (NOSTATE)
