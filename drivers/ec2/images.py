"""The default image: the newest official Debian 12 AMI of the region and architecture, looked up at create time.

Debian publishes its cloud images from one AWS account, named `debian-12-<arch>-<date>-<build>`; backports
kernels and daily builds have other names, so the pattern selects the released images only. Looking them up
(not pinning an id) gives every region its own id and always the current point release.
"""

from __future__ import annotations

from typing import Any

from machine.drivers.ec2.api import translated
from machine.errors import MachineError

DEBIAN_OWNER = "136693071363"  # Debian's AWS account (https://wiki.debian.org/Cloud/AmazonEC2Image)
# EC2's architecture names -> Debian's
DEBIAN_ARCH = {"x86_64": "amd64", "arm64": "arm64"}


def default_debian(ec2: Any, region: str, architecture: str) -> dict[str, Any]:
    """The newest available Debian 12 image for `architecture` (EC2's name: x86_64, arm64)."""
    arch = DEBIAN_ARCH.get(architecture)
    if arch is None:
        raise MachineError(f"Debian publishes no image for {architecture}: pass --ec2-ami")
    pattern = f"debian-12-{arch}-*"
    with translated(f"looking up the Debian 12 image in {region}"):
        images = ec2.describe_images(Owners=[DEBIAN_OWNER], Filters=[
            {"Name": "name", "Values": [pattern]}, {"Name": "architecture", "Values": [architecture]},
            {"Name": "state", "Values": ["available"]}])["Images"]
    images = [i for i in images if i.get("OwnerId") == DEBIAN_OWNER]  # the filter is the API's; check it
    if not images:
        raise MachineError(f"no Debian 12 image ({pattern} of account {DEBIAN_OWNER}) in {region}: pass --ec2-ami")
    return max(images, key=lambda i: (i.get("CreationDate", ""), i.get("Name", "")))
