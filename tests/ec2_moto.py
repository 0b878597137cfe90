"""A real moto server on 127.0.0.1 for the EC2 driver's tests and bench: its process, an environment in which
pymachine can reach nothing else, a boto3 client to assert through, its request log, and what a machine left.

Nothing here talks to AWS: every client is given the server's endpoint, AWS_ENDPOINT_URL points any other at it,
instance metadata (169.254.169.254) is disabled, and any other HTTP(S) goes to a proxy on a closed port.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3

from machine.drivers.ec2.images import DEBIAN_OWNER

REGION = "us-east-1"
OTHER_OWNER = "099720109477"

# Fake images: the newest released Debian 12 amd64 is NEWEST; every newer or look-alike one must lose for a reason
# (another owner, a backports or older release, another architecture, not available).
NEWEST = "ami-0deb12a000000003"
AMIS = [
    ("ami-0deb12a000000001", "debian-12-amd64-20240102-1614", DEBIAN_OWNER, "x86_64", "2024-01-02T16:14:00.000Z"),
    (NEWEST, "debian-12-amd64-20250610-2133", DEBIAN_OWNER, "x86_64", "2025-06-10T21:33:00.000Z"),
    ("ami-0deb12a000000002", "debian-12-amd64-20241201-1948", DEBIAN_OWNER, "x86_64", "2024-12-01T19:48:00.000Z"),
    ("ami-0deb12b000000001", "debian-12-backports-amd64-20251001-0000", DEBIAN_OWNER, "x86_64",
     "2025-10-01T00:00:00.000Z"),
    ("ami-0deb11a000000001", "debian-11-amd64-20251001-0000", DEBIAN_OWNER, "x86_64", "2025-10-01T00:00:00.000Z"),
    ("ami-0fa4e00000000001", "debian-12-amd64-20251101-0000", OTHER_OWNER, "x86_64", "2025-11-01T00:00:00.000Z"),
]


def ami_file(path: Path) -> Path:
    """A MOTO_AMIS_PATH file: the only images the server knows (no arm64 Debian 12 among them)."""
    path.write_text(json.dumps([{
        "ami_id": ami, "name": name, "description": name, "owner_id": owner, "public": True,
        "virtualization_type": "hvm", "architecture": arch, "state": "available", "platform": None,
        "image_type": "machine", "hypervisor": "xen", "root_device_name": "/dev/xvda", "root_device_type": "ebs",
        "sriov": "simple", "creation_date": created,
    } for ami, name, owner, arch, created in AMIS]))
    return path


# `python -m moto.server`, taught DescribeInstances' `client-token` filter, which EC2 has and the EC2 driver looks a
# launch up by (moto keeps each instance's token, but answers the filter with NotImplementedError).
SERVER = ("from moto.ec2 import utils; utils.filter_dict_attribute_mapping.setdefault('client-token', 'client_token'); "
          "from moto.server import main; main()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoServer:
    url: str
    recording: Path
    proc: subprocess.Popen[bytes]

    def post(self, path: str) -> None:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                urllib.request.Request(self.url + path, method="POST", data=b""), timeout=30):
            pass

    def reset(self) -> None:
        """Forget every resource (the images are loaded again) and the request log."""
        self.post("/moto-api/reset")
        self.recording.write_text("")

    def requests(self) -> list[dict[str, list[str]]]:
        """The EC2 query requests received since the last reset (their form parameters)."""
        found = []
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode()
            params = parse_qs(body, keep_blank_values=True)
            if "Action" in params:
                found.append(params)
        return found

    def actions(self) -> Counter[str]:
        return Counter(r["Action"][0] for r in self.requests())

    def client(self) -> Any:
        return boto3.client("ec2", region_name=REGION, endpoint_url=self.url, aws_access_key_id="testing",
                            aws_secret_access_key="testing")


@contextlib.contextmanager
def moto_server(directory: Path) -> Iterator[MotoServer]:
    port = free_port()
    recording = directory / "recording.jsonl"
    recording.write_text("")
    env = {**os.environ, "MOTO_AMIS_PATH": str(ami_file(directory / "amis.json")),
           "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true", "MOTO_ENABLE_RECORDING": "true",
           "MOTO_RECORDER_FILEPATH": str(recording)}
    log = (directory / "moto.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    server = MotoServer(f"http://127.0.0.1:{port}", recording, proc)
    try:
        for _ in range(600):  # until it answers (it imports every service's models first)
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {(directory / 'moto.log').read_text()[-2000:]}")
            try:
                server.post("/moto-api/reset")
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("moto server did not answer")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def sealed_env(server: MotoServer, home: Path) -> dict[str, str]:
    """pymachine's environment: test credentials, the server as the only endpoint, nothing else reachable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYMACHINE_EC2_"))}
    env.pop("DOCKER_HOST", None)
    return env | {
        "PYMACHINE_HOME": str(home),
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
        "PYMACHINE_EC2_ENDPOINT": server.url,
        # Belt and braces: a client made without the endpoint still reaches only the server, boto3 never asks
        # 169.254.169.254 for credentials, and any other HTTP(S) request fails at a closed local port.
        "AWS_ENDPOINT_URL": server.url, "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(home.parent / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home.parent / "no-aws-credentials"),
        "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1",
        "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": "127.0.0.1",
    }


def cloud_leftovers(ec2: Any, machine_id: str) -> list[str]:
    """Everything of one machine that still exists in EC2, found by its id tag and its names."""
    tag = [{"Name": "tag:pymachine-machine-id", "Values": [machine_id]}]
    found = [f"instance {i['InstanceId']} ({i['State']['Name']})"
             for r in ec2.describe_instances(Filters=tag)["Reservations"] for i in r["Instances"]
             if i["State"]["Name"] != "terminated"]
    found += [f"volume {v['VolumeId']}" for v in ec2.describe_volumes(Filters=tag)["Volumes"]]
    found += [f"security group {g['GroupName']}" for g in ec2.describe_security_groups()["SecurityGroups"]
              if g["GroupName"].endswith(f"-{machine_id}") or machine_id in str(g.get("Tags"))]
    found += [f"key pair {k['KeyName']}" for k in ec2.describe_key_pairs()["KeyPairs"]
              if k["KeyName"].endswith(f"-{machine_id}")]
    found += [f"spot request {s['SpotInstanceRequestId']}"
              for s in ec2.describe_spot_instance_requests(Filters=tag)["SpotInstanceRequests"]
              if s["State"] in ("open", "active", "disabled")]
    return found


def all_cloud_resources(ec2: Any) -> set[str]:
    """Every instance not terminated, volume, non-default group and key pair in the region: for failed creates,
    whose machine id may never have been seen. (moto makes a volume for each image: compare with a baseline.)"""
    found = [f"instance {i['InstanceId']}" for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
             if i["State"]["Name"] != "terminated"]
    found += [f"volume {v['VolumeId']}" for v in ec2.describe_volumes()["Volumes"]]
    found += [f"security group {g['GroupName']}" for g in ec2.describe_security_groups()["SecurityGroups"]
              if g["GroupName"] != "default"]
    found += [f"key pair {k['KeyName']}" for k in ec2.describe_key_pairs()["KeyPairs"]]
    return set(found)
