"""cloud-init user-data, shared by the drivers whose hosts boot a cloud image (libvirt's NoCloud seed, EC2's
user-data): the hostname, the machine's authorized key for the user pymachine logs in as, and the host key
pymachine generated and pins before the first boot."""

from __future__ import annotations

from typing import TYPE_CHECKING

from machine import templating
from machine.paths import data_dir

if TYPE_CHECKING:
    from machine.sshkeys import KeyPair


def user_data(hostname: str, user: str, user_key: str, host_key: KeyPair) -> str:
    """`#cloud-config` user-data. `root` logs in directly (disable_root: false); any other user is made with
    passwordless sudo, and root stays disabled."""
    env = templating.environment(data_dir("templates") / "cloud-init", trim_blocks=True, lstrip_blocks=True)
    return env.get_template("user-data.j2").render(
        hostname=hostname, user=user, user_key=user_key, host_private=host_key.private_openssh.decode(),
        host_public=host_key.public_line)
