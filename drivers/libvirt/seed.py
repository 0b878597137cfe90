"""The cloud-init NoCloud seed: user-data, meta-data and network-config on an ISO 9660 volume labelled cidata.

The ISO is made in memory with pycdlib (pure Python): no xorriso/genisoimage needed on the host, no temp
files, and the same bytes whether pymachine runs as root or not.
"""

from __future__ import annotations

import io

from machine import cloudinit
from machine.drivers.libvirt.domain import templates
from machine.errors import MachineError
from machine.sshkeys import KeyPair

FILES = ("user-data", "meta-data", "network-config")


def render(hostname: str, instance_id: str, user_key: str, host_key: KeyPair, mac: str) -> dict[str, str]:
    """The seed's files; user-data is the one every cloud-image driver shares (pymachine logs in as root here)."""
    env = templates()
    values = {"hostname": hostname, "instance_id": instance_id, "mac": mac}
    return {"user-data": cloudinit.user_data(hostname, "root", user_key, host_key),
            **{name: env.get_template(f"{name}.j2").render(**values) for name in FILES if name != "user-data"}}


def iso(files: dict[str, str]) -> bytes:
    """An ISO with Joliet and Rock Ridge names (cloud-init wants the exact lowercase, hyphenated names)."""
    try:
        import pycdlib
    except ImportError:
        raise MachineError("the libvirt driver needs pycdlib: pip install 'pymachine[libvirt]'") from None

    image = pycdlib.PyCdlib()
    image.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for index, (name, text) in enumerate(sorted(files.items())):
        data = text.encode()
        image.add_fp(io.BytesIO(data), len(data), f"/FILE{index};1", rr_name=name, joliet_path=f"/{name}")
    out = io.BytesIO()
    image.write_fp(out)
    image.close()
    return out.getvalue()
