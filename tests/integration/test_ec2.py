"""The EC2 driver through the real CLI and real boto3, against a real moto server on 127.0.0.1.

Every effect is asserted through boto3 against the server (and its request log), never through pymachine's own
record alone. moto's instances have no SSH and their addresses are not ours: nothing is ever sent to them.
Machines are made with `create --no-connect`, and `start` (which waits for SSH in the CLI) runs the driver
in-process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from machine import drivers
from machine.commands.machines import create as create_machine
from machine.commands.machines import remove_machine
from machine.drivers.ec2 import VISIBLE_TIMEOUT, WAIT, EC2Driver, api, images
from machine.errors import MachineError
from machine.store import Store
from tests.conftest import CLI, http_on_loopback
from tests.ec2_moto import NEWEST, REGION, MotoServer, all_cloud_resources, cloud_leftovers, moto_server, sealed_env
from tests.integration.conftest import damage_record, kill_create_at

pytestmark = pytest.mark.integration

CIDRS = ("--ec2-allowed-cidr", "203.0.113.7/32")
# The journal lines an EC2 create writes: identity; region, image and key pair name; key pair id; group name;
# group id; host key and client token; instance id; addresses.
EC2_STEPS = 8


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


class Cloud:
    """boto3 on the server, and what existed before the test (moto makes a volume per image)."""

    def __init__(self, server: MotoServer) -> None:
        server.reset()
        self.server = server
        self.ec2 = server.client()
        self.baseline = all_cloud_resources(self.ec2)
        server.recording.write_text("")  # the log holds pymachine's requests (and the test's own after this)

    def new_resources(self) -> set[str]:
        return all_cloud_resources(self.ec2) - self.baseline

    def instance(self, instance_id: str) -> dict[str, Any]:
        [reservation] = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        return reservation["Instances"][0]

    def request(self, action: str) -> dict[str, str]:
        """The parameters of the one `action` request pymachine made since the log was last cleared."""
        [found] = [r for r in self.server.requests() if r["Action"] == [action]]
        return {k: v[0] for k, v in found.items()}


@pytest.fixture
def cloud(moto: MotoServer) -> Cloud:
    return Cloud(moto)


@pytest.fixture
def cli(cloud: Cloud, tmp_path: Path) -> Iterator[CLI]:
    c = CLI(sealed_env(cloud.server, tmp_path / "home"))
    yield c
    names = c("ls", "-q", check=False).stdout.split()
    if names:
        c("rm", "-f", *names, check=False)


def record(cli: CLI, name: str) -> dict[str, Any]:
    return json.loads((cli.home / "machines" / name / "config.json").read_text())


def create(cli: CLI, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return cli("create", "--driver", "ec2", "--no-connect", *args, name, check=check)


def stored(cli: CLI) -> list[Path]:
    """Everything in the store's machines directory, staging and trash directories included."""
    machines = cli.home / "machines"
    return list(machines.iterdir()) if machines.exists() else []


def assert_one_line(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pymachine: "), proc.stderr


def in_process(cli: CLI, monkeypatch: pytest.MonkeyPatch) -> Store:
    """This process set up as the CLI's (the same sealed environment), with boto3's caches empty."""
    for key in [k for k in os.environ if k.startswith(("AWS_", "PYMACHINE_"))]:
        monkeypatch.delenv(key)
    for key, value in cli.env.items():
        if key.startswith(("AWS_", "PYMACHINE_")) or key.lower() in ("http_proxy", "https_proxy", "no_proxy"):
            monkeypatch.setenv(key, value)
    api._CLIENTS.clear()
    api._SESSIONS.clear()
    api._ACCOUNTS.clear()
    api.CHECKED.clear()
    api.Listing._cache.clear()
    return Store(cli.home)


def rules(group: dict[str, Any]) -> set[tuple[str, int, int, str]]:
    found = set()
    for p in group["IpPermissions"]:
        for r in p.get("IpRanges", []):
            found.add((p["IpProtocol"], p["FromPort"], p["ToPort"], r["CidrIp"]))
        for r in p.get("Ipv6Ranges", []):
            found.add((p["IpProtocol"], p["FromPort"], p["ToPort"], r["CidrIpv6"]))
        assert not p.get("UserIdGroupPairs") and not p.get("PrefixListIds"), p
    return found


# -- create ---------------------------------------------------------------------------------------------------
def test_create_makes_exactly_what_it_says(cli, cloud):
    cidrs = ("203.0.113.7/32", "198.51.100.0/24", "2001:db8::/48")
    kms_key("alias/pm-test", cloud)
    create(cli, "web1", *(a for c in cidrs for a in ("--ec2-allowed-cidr", c)), "--ec2-root-size", "24",
           "--ec2-volume-type", "gp2", "--ec2-volume-encrypted", "--ec2-kms-key", "alias/pm-test",
           "--ec2-tags", "team=web", "--ec2-tags", "cost=42")
    rec = record(cli, "web1")
    mid, res, base = rec["id"], rec["resources"], f"pymachine-web1-{rec['id']}"
    assert "ec2_access_key" not in rec["options"] and "testing" not in json.dumps(rec)
    tags = {"Name": "web1", "pymachine-machine-id": mid, "pymachine-home": str(cli.home),
            "pymachine-machine": "web1", "team": "web", "cost": "42"}

    instance = cloud.instance(res["instance_id"])
    assert instance["State"]["Name"] == "running"
    assert instance["ImageId"] == NEWEST  # the newest released Debian 12 amd64 of Debian's account
    assert instance["InstanceType"] == "t3.small" and instance["KeyName"] == base
    assert api.tags_of(instance) == tags
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    # Hop limit 1: containers behind the engine's bridge NAT get no IMDSv2 token, so no user-data (the host key).
    assert instance["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert res["account"] == "123456789012"  # moto's default account, as STS says
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == [res["group_id"]]

    [volume] = cloud.ec2.describe_volumes(
        Filters=[{"Name": "attachment.instance-id", "Values": [res["instance_id"]]}])["Volumes"]
    assert (volume["Size"], volume["VolumeType"], volume["Encrypted"], volume["KmsKeyId"]) == (
        24, "gp2", True, "alias/pm-test")
    assert volume["Attachments"][0]["Device"] == "/dev/xvda"
    assert api.tags_of(volume) == tags

    # Tags at launch (no CreateTags afterwards), IMDSv2, an idempotency token from the machine's id.
    run = cloud.request("RunInstances")
    assert "CreateTags" not in cloud.server.actions()
    specs = {run[f"TagSpecification.{i}.ResourceType"] for i in (1, 2)}
    assert specs == {"instance", "volume"} and "TagSpecification.3.ResourceType" not in run
    assert run["ClientToken"] == f"pymachine-{mid}" and run["MetadataOptions.HttpTokens"] == "required"
    assert run["MetadataOptions.HttpPutResponseHopLimit"] == "1"
    assert run["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] == "true"

    [group] = cloud.ec2.describe_security_groups(GroupIds=[res["group_id"]])["SecurityGroups"]
    assert group["GroupName"] == base and api.tags_of(group)["pymachine-machine-id"] == mid
    [default_vpc] = cloud.ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    assert group["VpcId"] == default_vpc["VpcId"]
    assert rules(group) == {("tcp", port, port, c) for port in (22, 2376) for c in cidrs}
    assert group["IpPermissionsEgress"]  # the default egress rule: the machine installs packages

    [pair] = cloud.ec2.describe_key_pairs(KeyNames=[base])["KeyPairs"]
    assert api.tags_of(pair)["pymachine-machine-id"] == mid

    public_key = (cli.home / "machines/web1/id_ed25519.pub").read_text().split()[:2]
    raw = cloud.ec2.describe_instance_attribute(InstanceId=res["instance_id"], Attribute="userData")
    user_data = base64.b64decode(raw["UserData"]["Value"]).decode()
    assert user_data.startswith("#cloud-config\n")
    data = yaml.safe_load(user_data)
    [user] = data["users"]
    assert user["name"] == "admin" and user["sudo"] == "ALL=(ALL) NOPASSWD:ALL" and data["disable_root"] is True
    assert [k.split()[:2] for k in user["ssh_authorized_keys"]] == [public_key]
    assert data["ssh_keys"]["ed25519_public"] == res["host_key"]

    # Addresses as EC2 has them, and the host key pinned for the address pymachine reaches.
    assert (res["ip"], res["public_ip"], res["private_ip"]) == (
        instance["PublicIpAddress"], instance["PublicIpAddress"], instance["PrivateIpAddress"])
    assert res["public_dns"] == instance["PublicDnsName"]
    known = (cli.home / "machines/web1/known_hosts").read_text().split()
    assert known == [res["ip"], *res["host_key"].split()[:2]]

    # The queries.
    assert cli("status", "web1").stdout.strip() == "Running"
    assert cli("ip", "web1").stdout.strip() == instance["PublicIpAddress"]
    assert cli("url", "web1").stdout.strip() == f"tcp://{instance['PublicIpAddress']}:2376"
    inspected = json.loads(cli("inspect", "web1").stdout)
    assert inspected["ssh"]["user"] == "admin" and inspected["ssh"]["port"] == 22
    assert inspected["state"] == "Running" and inspected["resources"]["instance_id"] == res["instance_id"]
    [row] = json.loads(cli("ls", "--format", "json").stdout)
    assert (row["name"], row["driver"], row["state"], row["error"]) == ("web1", "ec2", "Running", "")


def test_the_engine_certificate_names_every_address(cli, cloud, monkeypatch):
    create(cli, "web1", *CIDRS)
    store = in_process(cli, monkeypatch)
    machine = store.load("web1")
    instance = cloud.instance(machine.resources["instance_id"])
    names = drivers.get("ec2")(machine, store).cert_names()
    assert set(names) == {instance["PublicIpAddress"], instance["PrivateIpAddress"], instance["PublicDnsName"],
                          instance["PrivateDnsName"]}


def test_private_address_zone_and_another_ssh_user(cli, cloud):
    create(cli, "web1", *CIDRS, "--ec2-use-private-address", "--ec2-ssh-user", "deploy",
           "--ec2-zone", "us-east-1c")
    res = record(cli, "web1")["resources"]
    instance = cloud.instance(res["instance_id"])
    assert res["ip"] == instance["PrivateIpAddress"] and instance["Placement"]["AvailabilityZone"] == "us-east-1c"
    assert json.loads(cli("inspect", "web1").stdout)["ssh"]["user"] == "deploy"
    raw = cloud.ec2.describe_instance_attribute(InstanceId=res["instance_id"], Attribute="userData")
    assert yaml.safe_load(base64.b64decode(raw["UserData"]["Value"]))["users"][0]["name"] == "deploy"


def test_spot_instance(cli, cloud):
    create(cli, "spot1", *CIDRS, "--ec2-spot", "--ec2-spot-max-price", "0.05")
    rec = record(cli, "spot1")
    assert cloud.instance(rec["resources"]["instance_id"])["InstanceLifecycle"] == "spot"
    run = cloud.request("RunInstances")
    assert run["InstanceMarketOptions.MarketType"] == "spot"
    assert run["InstanceMarketOptions.SpotOptions.MaxPrice"] == "0.05"
    assert run["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "persistent"
    assert run["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "stop"
    assert {run[f"TagSpecification.{i}.ResourceType"] for i in (1, 2, 3)} == {
        "instance", "volume", "spot-instances-request"}
    cli("rm", "-y", "spot1")
    assert cloud_leftovers(cloud.ec2, rec["id"]) == []


def test_an_existing_subnet_and_security_group(cli, cloud):
    vpc = cloud.ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = cloud.ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24", AvailabilityZone="us-east-1b")
    subnet_id = subnet["Subnet"]["SubnetId"]
    group = cloud.ec2.create_security_group(GroupName="mine", Description="mine", VpcId=vpc)["GroupId"]
    cloud.server.recording.write_text("")
    create(cli, "web1", "--ec2-subnet-id", subnet_id, "--ec2-security-group", "mine")
    rec = record(cli, "web1")
    instance = cloud.instance(rec["resources"]["instance_id"])
    assert instance["SubnetId"] == subnet_id and instance["Placement"]["AvailabilityZone"] == "us-east-1b"
    assert [g["GroupId"] for g in instance["SecurityGroups"]] == [group]
    assert "CreateSecurityGroup" not in cloud.server.actions()
    cli("rm", "-y", "web1")
    assert cloud_leftovers(cloud.ec2, rec["id"]) == []
    # The user's group is theirs: rm leaves it.
    assert cloud.ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"]


# -- lifecycle ------------------------------------------------------------------------------------------------
def test_stop_start_kill_restart_follow_the_instance(cli, cloud, monkeypatch):
    create(cli, "web1", *CIDRS)
    instance_id = record(cli, "web1")["resources"]["instance_id"]

    cloud.server.recording.write_text("")
    cli("stop", "web1")
    assert cloud.instance(instance_id)["State"]["Name"] == "stopped"
    assert cloud.request("StopInstances").get("Force", "false") == "false"
    assert cli("status", "web1").stdout.strip() == "Stopped"
    [row] = json.loads(cli("ls", "--format", "json").stdout)
    assert row["state"] == "Stopped"

    # `pymachine start` waits for SSH on the instance; moto's is not there: the driver's start runs here.
    store = in_process(cli, monkeypatch)
    cloud.server.recording.write_text("")
    with store.locked("web1") as machine:
        drivers.get("ec2")(machine, store).start()
    now = cloud.instance(instance_id)
    assert now["State"]["Name"] == "running" and "StartInstances" in cloud.server.actions()
    # The addresses were read again after the start and recorded (a started instance gets a new public IP).
    res = record(cli, "web1")["resources"]
    assert (res["ip"], res["public_ip"], res["private_ip"]) == (
        now["PublicIpAddress"], now["PublicIpAddress"], now["PrivateIpAddress"])
    assert cli("status", "web1").stdout.strip() == "Running"

    cloud.server.recording.write_text("")
    cli("kill", "web1")
    assert cloud.request("StopInstances")["Force"] == "true"
    assert cloud.instance(instance_id)["State"]["Name"] == "stopped"
    assert cli("status", "web1").stdout.strip() == "Stopped"

    with store.locked("web1") as machine:
        driver = drivers.get("ec2")(machine, store)
        driver.start()
        cloud.server.recording.write_text("")
        # restart waits for SSH to go down (the reboot has begun). moto's addresses are never contacted: SSH is
        # a listener here, closed 1.5 s into the reboot, as sshd is when the OS shuts down.
        began = time.monotonic()
        with local_sshd(after=1.5) as port:
            machine.record(ip="127.0.0.1", ssh_port=port)
            driver.restart()  # a reboot: the instance keeps its address and so its certificate
            assert time.monotonic() - began >= 1.5
    assert cloud.request("RebootInstances")["InstanceId.1"] == instance_id
    assert cli("status", "web1").stdout.strip() == "Running"
    # SSH not answering from here before the reboot: nothing to wait for, restart returns.
    with store.locked("web1") as machine:
        machine.record(ssh_port=free_closed_port())
        began = time.monotonic()
        drivers.get("ec2")(machine, store).restart()
        assert time.monotonic() - began < 5


def test_restart_of_a_stopped_instance_starts_it(cli, cloud, monkeypatch):
    """EC2 refuses RebootInstances for a stopped instance (IncorrectInstanceState; moto reboots it all the same)."""
    create(cli, "web1", *CIDRS)
    cli("stop", "web1")
    store = in_process(cli, monkeypatch)
    cloud.server.recording.write_text("")
    with store.locked("web1") as machine:
        machine.record(ip="127.0.0.1", ssh_port=free_closed_port())  # a reboot's SSH check never leaves this host
        EC2Driver(machine, store).restart()
        instance = cloud.instance(machine.resources["instance_id"])
        assert instance["State"]["Name"] == "running" and machine.resources["ip"] == instance["PublicIpAddress"]
    assert "StartInstances" in cloud.server.actions() and "RebootInstances" not in cloud.server.actions()
    cloud.ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
    with store.locked("web1") as machine, pytest.raises(MachineError, match="is terminated: remove the machine"):
        EC2Driver(machine, store).restart()


def test_a_stop_that_does_not_finish_in_time_is_forced(cli, cloud, monkeypatch):
    """docs/drivers.md: `stop` is orderly and forced after a timeout. Here the OS never shuts down: EC2 shows the
    instance `stopping` until a forced StopInstances."""
    create(cli, "web1", *CIDRS)
    store = in_process(cli, monkeypatch)
    monkeypatch.setitem(WAIT, "Delay", 0.1)
    monkeypatch.setitem(WAIT, "MaxAttempts", 3)
    forced: list[bool] = []

    def stopping(params: dict[str, Any], **_: Any) -> None:
        forced.append(params["body"].get("Force") == "true")

    def hung(parsed: dict[str, Any], **_: Any) -> None:
        for reservation in parsed.get("Reservations", []):
            for instance in reservation["Instances"]:
                if not any(forced):
                    instance["State"]["Name"] = "stopping"

    hook_clients(monkeypatch, {"before-call.ec2.StopInstances": stopping,
                               "after-call.ec2.DescribeInstances": hung})
    with store.locked("web1") as machine:
        EC2Driver(machine, store).stop()
        assert forced == [False, True]
        assert cloud.instance(machine.resources["instance_id"])["State"]["Name"] == "stopped"


def free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_sshd(after: float = 1.5) -> Iterator[int]:
    """A TCP listener on 127.0.0.1 standing in for the instance's sshd, closed `after` seconds into the with."""
    sock = socket.create_server(("127.0.0.1", 0))
    timer = threading.Timer(after, sock.close)
    timer.start()
    try:
        yield sock.getsockname()[1]
    finally:
        timer.cancel()
        sock.close()


def test_start_of_a_terminated_instance_says_to_remove_it(cli, cloud, monkeypatch):
    create(cli, "web1", *CIDRS)
    rec = record(cli, "web1")
    cloud.ec2.terminate_instances(InstanceIds=[rec["resources"]["instance_id"]])
    assert cli("status", "web1").stdout.strip() == "Error"
    store = in_process(cli, monkeypatch)
    with store.locked("web1") as machine, pytest.raises(MachineError, match="rm -f web1"):
        drivers.get("ec2")(machine, store).start()
    cli("rm", "-y", "web1")
    assert cloud_leftovers(cloud.ec2, rec["id"]) == [] and cli("ls", "-q").stdout.strip() == ""


# -- rm -------------------------------------------------------------------------------------------------------
def test_rm_removes_everything_and_only_its_own(cli, cloud):
    create(cli, "web1", *CIDRS)
    create(cli, "web2", *CIDRS)
    one, two = record(cli, "web1"), record(cli, "web2")
    assert cloud_leftovers(cloud.ec2, one["id"])
    cli("rm", "-y", "web1")
    assert cloud_leftovers(cloud.ec2, one["id"]) == []
    assert cloud.instance(one["resources"]["instance_id"])["State"]["Name"] == "terminated"
    assert not (cli.home / "machines/web1").exists()
    assert len(cloud_leftovers(cloud.ec2, two["id"])) == 4  # instance, volume, group, key pair
    assert cli("status", "web2").stdout.strip() == "Running"
    cli("rm", "-y", "web2")
    assert cloud.new_resources() == set()


def test_ls_asks_ec2_once_per_region(cli, cloud):
    for name in ("a1", "a2", "a3"):
        create(cli, name, *CIDRS)
    create(cli, "w1", *CIDRS, "--ec2-region", "us-west-2")
    cloud.server.recording.write_text("")
    rows = json.loads(cli("ls", "--format", "json").stdout)
    assert [(r["name"], r["state"]) for r in rows] == [(n, "Running") for n in ("a1", "a2", "a3", "w1")]
    assert cloud.server.actions() == {"DescribeInstances": 2}
    cli("rm", "-y", "a1", "a2", "a3", "w1")
    assert cloud.new_resources() == set()


def test_ls_of_machines_in_error_reads_the_instances_from_the_listing(cli, cloud):
    """A machine in state `error` shows what is left of it: its instance from the one listing of the region,
    the account from one STS call; its group and key pair cost one call each."""
    for name in ("e1", "e2", "e3"):
        create(cli, name, *CIDRS)
        config = cli.home / "machines" / name / "config.json"
        config.write_text(json.dumps(json.loads(config.read_text()) | {"state": "error"}))
    cloud.server.recording.write_text("")
    rows = json.loads(cli("ls", "--format", "json").stdout)
    assert all("instance i-" in r["error"] and "(running)" in r["error"] for r in rows), rows
    assert cloud.server.actions() == {"DescribeInstances": 1, "GetCallerIdentity": 1,
                                      "DescribeSecurityGroups": 3, "DescribeKeyPairs": 3}


def other_account_env(cloud: Cloud, cli: CLI, account: str) -> dict[str, str]:
    """The CLI's environment with credentials of `account` (moto maps an assumed role's keys to its account)."""
    sts = boto3_client(cloud, "sts")
    creds = sts.assume_role(RoleArn=f"arn:aws:iam::{account}:role/other",
                            RoleSessionName="other-account")["Credentials"]
    return cli.env | {"AWS_ACCESS_KEY_ID": creds["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": creds["SecretAccessKey"],
                      "AWS_SESSION_TOKEN": creds["SessionToken"]}


def boto3_client(cloud: Cloud, service: str) -> Any:
    import boto3

    return boto3.client(service, region_name=REGION, endpoint_url=cloud.server.url, aws_access_key_id="testing",
                        aws_secret_access_key="testing")


def test_rm_with_another_accounts_credentials_refuses_and_keeps_everything(cli, cloud):
    create(cli, "web1", *CIDRS)
    rec = record(cli, "web1")
    assert rec["resources"]["account"] == "123456789012"
    other = CLI(other_account_env(cloud, cli, "111111111111"))
    for args in (("rm", "-y", "web1"), ("rm", "-f", "web1")):
        proc = other(*args, check=False)
        assert proc.returncode == 1, proc.stderr
        assert_one_line(proc)
        assert "123456789012" in proc.stderr and "111111111111" in proc.stderr
        assert "left: unknown" in proc.stderr  # not "nothing left": the record stays
    assert cloud.instance(rec["resources"]["instance_id"])["State"]["Name"] == "running"
    assert len(cloud_leftovers(cloud.ec2, rec["id"])) == 4
    [row] = json.loads(other("ls", "--format", "json").stdout)
    assert "unknown" in row["error"] and "111111111111" in row["error"]
    # The machine's own account removes it.
    cli("rm", "-f", "web1")
    assert cloud_leftovers(cloud.ec2, rec["id"]) == [] and cloud.new_resources() == set()


def test_is_alive_asks_ec2_every_few_seconds_and_fails_only_for_a_gone_instance(cli, cloud, monkeypatch):
    create(cli, "web1", *CIDRS)
    store = in_process(cli, monkeypatch)
    machine = store.load("web1")
    instance_id = machine.resources["instance_id"]
    driver = EC2Driver(machine, store)
    cloud.server.recording.write_text("")
    assert all(driver.is_alive() for _ in range(20))
    assert cloud.server.actions() == {"DescribeInstances": 1}  # the last answer, for ALIVE_INTERVAL
    cloud.ec2.stop_instances(InstanceIds=[instance_id])
    monkeypatch.setattr("machine.drivers.ec2.ALIVE_INTERVAL", 0.0)
    assert driver.is_alive()  # stopped is not gone
    cloud.ec2.terminate_instances(InstanceIds=[instance_id])
    assert not driver.is_alive()
    # EC2 not answering (a closed port here) is no reason to give up waiting.
    machine.options = machine.options | {"ec2_endpoint": f"http://127.0.0.1:{free_closed_port()}"}
    assert EC2Driver(machine, store).is_alive()


def test_remove_and_leftovers_use_the_recorded_names(cli, cloud, monkeypatch):
    """The journal names the key pair and group; the name derived from the machine is only the fallback."""
    create(cli, "web1", *CIDRS)
    store = in_process(cli, monkeypatch)
    cloud.ec2.create_key_pair(KeyName="pymachine-recorded")
    with store.locked("web1") as machine:
        machine.record(key_name="pymachine-recorded")
        driver = EC2Driver(machine, store)
        assert any(left.startswith("key pair pymachine-recorded (") for left in driver.leftovers())
        driver.remove()
        assert driver.leftovers() == []
    assert not cloud.ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": ["pymachine-recorded"]}])[
        "KeyPairs"]
    cli("rm", "-f", "web1")
    # The derived key pair (imported at create) was not deleted by the first remove: the recorded name is read.
    assert cloud.new_resources() == {f"key pair pymachine-web1-{machine.id}"}


# -- failures: one line, nothing made, nothing recorded ---------------------------------------------------------
BAD = {
    "no allowed cidr": ((), 2, "--ec2-allowed-cidr is required"),
    "an AMI that does not exist": (("--ec2-ami", "ami-0123456789abcdef0", *CIDRS), 2, "--ec2-ami: no image"),
    "a malformed AMI id": (("--ec2-ami", "debian", *CIDRS), 2, "--ec2-ami: no image"),
    "an instance type EC2 refuses": (("--ec2-instance-type", "m9.enormous", *CIDRS), 2, "no instance type"),
    "an unknown region": (("--ec2-region", "xx-nowhere-1", *CIDRS), 2, "unknown region 'xx-nowhere-1'"),
    "a zone of another region": (("--ec2-zone", "eu-west-1a", *CIDRS), 2, "not a zone of us-east-1"),
    "a zone that does not exist": (("--ec2-zone", "us-east-1q", *CIDRS), 2,
                                   "--ec2-zone us-east-1q is not a zone of us-east-1 (its zones: us-east-1a, "),
    "a zone that does not offer the instance type": (("--ec2-zone", "us-east-1e", *CIDRS), 2,
                                                     "--ec2-instance-type: us-east-1e offers no t3.small"),
    "no Debian image for the architecture": (("--ec2-instance-type", "t4g.small", *CIDRS), 1,
                                             "no Debian 12 image (debian-12-arm64-*"),
    "a subnet that does not exist": (("--ec2-subnet-id", "subnet-0123456789abcdef0", *CIDRS), 2, "no subnet"),
    "a group that does not exist": (("--ec2-security-group", "sg-0123456789abcdef0",), 2, "--ec2-security-group"),
    "a user name with a space": (("--ec2-ssh-user", "Bad User;x", *CIDRS), 2,
                                 "--ec2-ssh-user: 'Bad User;x' is not a user name"),
    "a user name ssh would read as an option": (("--ec2-ssh-user", "-oProxyCommand=touch x", *CIDRS), 2,
                                                "--ec2-ssh-user: '-oProxyCommand=touch x' is not a user name"),
    "a cidr with host bits": (("--ec2-allowed-cidr", "10.1.2.3/8"), 2, "has host bits set"),
    "a reserved tag": (("--ec2-tags", "pymachine-home=/x", *CIDRS), 2, "is reserved"),
    "a price without spot": (("--ec2-spot-max-price", "0.1", *CIDRS), 2, "needs --ec2-spot"),
    "an endpoint without a host": (("--ec2-endpoint", "http://", *CIDRS), 2, "'http://' names no host"),
    "an endpoint with a space": (("--ec2-endpoint", "http://exa mple", *CIDRS), 2, "no valid host name"),
    "an endpoint with a bad port": (("--ec2-endpoint", "http://127.0.0.1:99999", *CIDRS), 2, "no valid port"),
    "an HDD root volume": (("--ec2-volume-type", "st1", *CIDRS), 2, "'st1' is not one of gp3, gp2, io1, io2"),
    "io2 without iops": (("--ec2-volume-type", "io2", *CIDRS), 2, "--ec2-volume-type io2 needs --ec2-iops"),
    "iops of gp3": (("--ec2-iops", "3000", *CIDRS), 2, "--ec2-iops is for --ec2-volume-type io1 or io2 only"),
    "an instance profile IAM does not know": (("--ec2-iam-instance-profile", "nosuch", *CIDRS), 2,
                                              "--ec2-iam-instance-profile: no instance profile 'nosuch' "
                                              "(NoSuchEntity)"),
    "a KMS key that does not exist": (("--ec2-kms-key", "alias/nosuch", *CIDRS), 2,
                                      "--ec2-kms-key: no KMS key 'alias/nosuch' in us-east-1 (NotFoundException)"),
    # moto's images have a root snapshot of 15 GiB
    "a root volume below the image's snapshot": (("--ec2-root-size", "8", *CIDRS), 2,
                                                 f"--ec2-root-size: 8 GiB is less than the 15 GiB of the root "
                                                 f"snapshot of image {NEWEST}"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_up_front_and_leaves_nothing(cli, cloud, case):
    args, code, message = BAD[case]
    proc = create(cli, "bad", *args, check=False)
    assert proc.returncode == code, proc.stderr
    assert_one_line(proc)
    assert message in proc.stderr
    assert cloud.new_resources() == set()
    assert not any(a.startswith(("Create", "Import", "Run", "Authorize")) for a in cloud.server.actions())
    assert cli("ls", "-q").stdout.strip() == "" and not stored(cli)


def test_a_subnet_of_another_vpc_is_refused(cli, cloud):
    vpc = cloud.ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = cloud.ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
    [default_vpc] = cloud.ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    cloud.baseline = all_cloud_resources(cloud.ec2)
    proc = create(cli, "bad", *CIDRS, "--ec2-vpc-id", default_vpc["VpcId"], "--ec2-subnet-id", subnet, check=False)
    assert proc.returncode == 2
    assert_one_line(proc)
    assert f"--ec2-subnet-id {subnet} is in {vpc}, not in --ec2-vpc-id {default_vpc['VpcId']}" in proc.stderr
    assert cloud.new_resources() == set() and cli("ls", "-q").stdout.strip() == ""


@contextlib.contextmanager
def not_ec2() -> Iterator[str]:
    """An HTTP server on 127.0.0.1 that answers every request with an HTML 404, as a wrong URL would."""
    import http.server

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>not found</html>")

    with http_on_loopback(NotFound) as url:
        yield url


def test_an_endpoint_that_is_not_ec2_is_named_as_such(cli, cloud):
    port = free_closed_port()
    with not_ec2() as wrong:
        for url, message in ((f"http://127.0.0.1:{port}", f"--ec2-endpoint: cannot reach EC2 at http://127.0.0.1:"
                                                          f"{port}/"),
                             (wrong, f"--ec2-endpoint: {wrong} answers, but not as EC2 does")):
            proc = create(cli, "bad", *CIDRS, "--ec2-endpoint", url, check=False)
            assert proc.returncode == 1, proc.stderr
            assert_one_line(proc)
            assert message in proc.stderr
    assert cloud.server.actions() == {} and not stored(cli)


def test_missing_credentials_are_refused_before_anything(cli, cloud):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        del cli.env[key]
    proc = create(cli, "bad", *CIDRS, check=False)
    assert proc.returncode == 1
    assert_one_line(proc)
    assert "no AWS credentials" in proc.stderr
    assert cloud.server.actions() == {} and cli("ls", "-q").stdout.strip() == ""
    # A profile that does not exist is bad input too.
    proc = create(cli, "bad", *CIDRS, "--ec2-profile", "nosuch", check=False)
    assert proc.returncode == 2 and "nosuch" in proc.stderr
    assert_one_line(proc)


def kms_key(alias: str, cloud: Cloud, **spec: Any) -> dict[str, Any]:
    kms = boto3_client(cloud, "kms")
    key = kms.create_key(**spec)["KeyMetadata"]
    kms.create_alias(AliasName=alias, TargetKeyId=key["KeyId"])
    return key


def test_the_instance_profile_and_kms_key_are_checked_before_anything_is_made(cli, cloud):
    """IAM and KMS (at the same endpoint) are asked before anything is made: a key EBS cannot use, a profile ARN
    that is not the profile's, are refused in one line; existing ones, by name or ARN, are launched with."""
    iam = boto3_client(cloud, "iam")
    profile = iam.create_instance_profile(InstanceProfileName="web", Path="/pm/")["InstanceProfile"]
    disabled = kms_key("alias/off", cloud)
    boto3_client(cloud, "kms").disable_key(KeyId=disabled["KeyId"])
    kms_key("alias/sign", cloud, KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")
    key = kms_key("alias/on", cloud)
    cloud.baseline = all_cloud_resources(cloud.ec2)
    cloud.server.recording.write_text("")
    wrong_arn = profile["Arn"].replace("/pm/", "/")
    for args, message in ((("--ec2-kms-key", "alias/off"), "--ec2-kms-key: KMS key 'alias/off' is Disabled, not "
                                                          "Enabled"),
                          (("--ec2-kms-key", "alias/sign"), "--ec2-kms-key: KMS key 'alias/sign' is a RSA_2048 key "
                                                           "for SIGN_VERIFY: EBS encrypts only with a symmetric"),
                          (("--ec2-iam-instance-profile", wrong_arn),
                           f"--ec2-iam-instance-profile: no instance profile '{wrong_arn}' (the one named web is "
                           f"{profile['Arn']})")):
        proc = create(cli, "bad", *CIDRS, *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert_one_line(proc)
        assert message in proc.stderr
    assert not any(a.startswith(("Create", "Import", "Run", "Authorize")) for a in cloud.server.actions())
    assert cloud.new_resources() == set() and not stored(cli)

    cloud.server.recording.write_text("")
    create(cli, "web1", *CIDRS, "--ec2-iam-instance-profile", profile["Arn"], "--ec2-kms-key", key["Arn"])
    run = cloud.request("RunInstances")
    assert run["IamInstanceProfile.Arn"] == profile["Arn"] and run["BlockDeviceMapping.1.Ebs.KmsKeyId"] == key["Arn"]
    assert cloud.server.actions()["GetInstanceProfile"] == 1  # asked once, though create checks twice
    cloud.server.recording.write_text("")
    create(cli, "web2", *CIDRS, "--ec2-iam-instance-profile", "web")
    assert cloud.request("RunInstances")["IamInstanceProfile.Name"] == "web"


def not_allowed_to_read_iam_and_kms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials allowed to launch, but not to read instance profiles or KMS keys, as real ones may be."""
    hook_clients(monkeypatch, {"before-call.iam.GetInstanceProfile": lambda **_: ec2_error("AccessDenied"),
                               "before-call.kms.DescribeKey": lambda **_: ec2_error("AccessDeniedException")})


def create_refused_at_launch(store: Store, name: str, **options: Any) -> None:
    """A create whose launch EC2 refuses after the key pair and group are made: credentials that may not read
    IAM go on past the check (one warning), and the instance profile they name does not exist."""
    create_machine(store, name, "ec2", {"ec2_allowed_cidr": CIDRS[1:], "ec2_iam_instance_profile": "nosuch",
                                        "ec2_kms_key": "alias/nosuch"}, provision=False, wait_for_ssh=False,
                   **options)


def test_a_launch_ec2_refuses_is_rolled_back(cli, cloud, monkeypatch, capfd):
    """The key pair and group are made before RunInstances fails: the create removes them, and its error is the
    one raised. IAM and KMS the credentials may not read: one warning each, and the create goes on."""
    store = in_process(cli, monkeypatch)
    not_allowed_to_read_iam_and_kms(monkeypatch)
    with pytest.raises(MachineError, match=r"launching bad: .*nosuch"):
        create_refused_at_launch(store, "bad")
    err = capfd.readouterr().err
    assert err.count("warning: --ec2-iam-instance-profile nosuch not checked before the launch (reading instance "
                     "profile nosuch: AccessDenied") == 1, err
    assert err.count("warning: --ec2-kms-key alias/nosuch not checked before the launch") == 1, err
    assert {"ImportKeyPair", "CreateSecurityGroup", "RunInstances"} <= set(cloud.server.actions())
    assert cloud.new_resources() == set()
    assert cli("ls", "-q").stdout.strip() == "" and not stored(cli)


def test_keep_on_failure_keeps_it_and_rm_f_removes_it(cli, cloud, monkeypatch):
    store = in_process(cli, monkeypatch)
    not_allowed_to_read_iam_and_kms(monkeypatch)
    with pytest.raises(MachineError, match="launching bad"):
        create_refused_at_launch(store, "bad", keep_on_failure=True)
    rec = record(cli, "bad")
    assert rec["state"] == "error"
    left = cloud_leftovers(cloud.ec2, rec["id"])
    assert sorted(x.split()[0] for x in left) == ["key", "security"]
    [row] = json.loads(cli("ls", "--format", "json").stdout)
    assert "security group" in row["error"] and "key pair" in row["error"]
    cli("rm", "-f", "bad")
    assert cloud.new_resources() == set() and cli("ls", "-q").stdout.strip() == ""


# -- the default image ---------------------------------------------------------------------------------------
def test_the_default_image_is_the_newest_debian_12_of_the_architecture(cloud):
    image = images.default_debian(cloud.ec2, REGION, "x86_64")
    assert image["ImageId"] == NEWEST and image["Name"].startswith("debian-12-amd64-")
    with pytest.raises(MachineError, match=r"no Debian 12 image \(debian-12-arm64-\* of account 136693071363\) "
                                           r"in us-east-1: pass --ec2-ami"):
        images.default_debian(cloud.ec2, REGION, "arm64")


# -- the journal under faults ---------------------------------------------------------------------------------
def identity(cli: CLI, name: str) -> str:
    first = (cli.home / "machines" / name / "journal").read_text().splitlines()[0]
    return json.loads(first)["identity"]["id"]


def kill_at(cli: CLI, name: str, lines: int) -> None:
    kill_create_at(cli, name, lines, "--driver", "ec2", "--no-connect", *CIDRS)


def age_launch(cli: CLI, name: str) -> None:
    """Move the machine's recorded launch, group and key pair times VISIBLE_TIMEOUT back: as if `rm -f` came once
    EC2 has had the time to show any of them (a create killed just before RunInstances launched nothing: rm would
    wait that long)."""
    directory = cli.home / "machines" / name
    for path in (directory / "journal", directory / "config.json"):
        if path.exists():
            path.write_text(re.sub(r'("(?:launch|group|key_pair)_time": )([0-9.]+)',
                                   lambda m: f"{m[1]}{float(m[2]) - VISIBLE_TIMEOUT}", path.read_text()))


@pytest.mark.parametrize("step", range(1, EC2_STEPS + 1))
def test_a_create_killed_at_any_step_is_removed_without_a_trace(cli, cloud, step):
    kill_at(cli, "k", step)
    machine_id = identity(cli, "k")
    age_launch(cli, "k")
    proc = cli("rm", "-f", "k", check=False)
    assert proc.returncode == 0, proc.stderr
    assert cloud_leftovers(cloud.ec2, machine_id) == []
    assert cloud.new_resources() == set()
    assert not stored(cli)


DAMAGE = {"empty": "", "truncated": '{"na', "a list": "[]", "missing": None}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_record_is_shown_and_rm_f_removes_everything(cli, cloud, damage):
    create(cli, "d", *CIDRS)
    rec = record(cli, "d")
    damage_record(cli, "d", DAMAGE[damage])
    for command in ("status", "ip", "inspect", "stop", "kill"):
        proc = cli(command, "d", check=False)
        assert proc.returncode == 1, (command, proc.stderr)
        assert_one_line(proc)
    [row] = json.loads(cli("ls", "--format", "json").stdout)
    assert row["state"] == "Error" and f"instance {rec['resources']['instance_id']} (running)" in row["error"]
    assert "security group" in row["error"] and "key pair" in row["error"]
    assert cloud.instance(rec["resources"]["instance_id"])["State"]["Name"] == "running"  # nothing took it down
    proc = cli("rm", "-f", "d", check=False)
    assert proc.returncode == 0, proc.stderr
    assert cloud_leftovers(cloud.ec2, rec["id"]) == [] and cloud.new_resources() == set()


def test_an_instance_whose_id_never_reached_the_journal_is_found_by_its_tag(cli, cloud):
    """A create killed between RunInstances and the journal line of its id, simulated: the lines from the
    instance id on are cut off and config.json is gone. rm -f finds the instance by its pymachine-machine-id tag,
    the group and key pair by their names."""
    create(cli, "lost", *CIDRS)
    rec = record(cli, "lost")
    journal = cli.home / "machines/lost/journal"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(line for line in lines if "instance_id" not in line and '"ip"' not in line
                                 and "group_id" not in line) + "\n")
    (cli.home / "machines/lost/config.json").unlink()
    proc = cli("rm", "-f", "lost", check=False)
    assert proc.returncode == 0, proc.stderr
    assert cloud.instance(rec["resources"]["instance_id"])["State"]["Name"] == "terminated"
    assert cloud_leftovers(cloud.ec2, rec["id"]) == [] and cloud.new_resources() == set()


def test_another_stores_instance_with_the_same_id_is_never_touched(cli, cloud, tmp_path):
    """Tags name the store too: an instance tagged with our machine id but another home is not ours."""
    create(cli, "web1", *CIDRS)
    rec = record(cli, "web1")
    foreign = cloud.ec2.run_instances(ImageId=NEWEST, MinCount=1, MaxCount=1, TagSpecifications=[
        {"ResourceType": "instance", "Tags": [{"Key": "pymachine-machine-id", "Value": rec["id"]},
                                              {"Key": "pymachine-home", "Value": str(tmp_path / "elsewhere")}]}])
    foreign_id = foreign["Instances"][0]["InstanceId"]
    cli("rm", "-y", "web1")
    assert cloud.instance(foreign_id)["State"]["Name"] == "running"
    assert cloud.instance(rec["resources"]["instance_id"])["State"]["Name"] == "terminated"


# -- eventual consistency: an instance EC2 does not show yet is never forgotten -------------------------------
def hook_clients(monkeypatch: pytest.MonkeyPatch, handlers: dict[str, Callable[..., Any]]) -> None:
    """Register botocore event handlers (event name: handler) on every AWS client (EC2, STS, IAM, KMS) pymachine
    makes from now on (not on the test's own clients)."""
    real = api.service_client

    def service_client(*args: Any, **kwargs: Any) -> Any:
        made = real(*args, **kwargs)
        for event, handler in handlers.items():
            made.meta.events.register(event, handler, unique_id=f"test-{event}")
        return made

    monkeypatch.setattr(api, "service_client", service_client)


class Unseen:
    """EC2's eventual consistency, played on pymachine's clients: from the moment RunInstances answers and for
    `seconds`, DescribeInstances does not show the new instance, as EC2 may right after a launch: asked by id it
    answers InvalidInstanceID.NotFound, asked by a filter nothing. Queries with a filter named in `except_filters`
    see it. With `interrupt`, Ctrl-C comes as RunInstances answers, before the instance id is journaled."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float, except_filters: tuple[str, ...] = (),
                 interrupt: bool = False) -> None:
        self.seconds, self.except_filters, self.interrupt = seconds, except_filters, interrupt
        self.until = 0.0
        self.hidden = 0
        hook_clients(monkeypatch, {"after-call.ec2.RunInstances": self._launched,
                                   "before-call.ec2.DescribeInstances": self._describe})

    def _launched(self, **_: Any) -> None:
        self.until = time.monotonic() + self.seconds
        if self.interrupt:
            raise KeyboardInterrupt

    def _describe(self, params: dict[str, Any], **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        body = params["body"]
        filters = {v for k, v in body.items() if re.fullmatch(r"Filter\.\d+\.Name", k)}
        if time.monotonic() >= self.until or filters & set(self.except_filters):
            return None  # asked of the server
        self.hidden += 1
        if any(k.startswith("InstanceId.") for k in body):
            return AWSResponse("", 400, {}, None), {
                "Error": {"Code": "InvalidInstanceID.NotFound", "Message": "The instance ID does not exist"},
                "ResponseMetadata": {}}
        return AWSResponse("", 200, {}, None), {"Reservations": [], "ResponseMetadata": {}}


def create_in_process(store: Store, name: str) -> None:
    create_machine(store, name, "ec2", {"ec2_allowed_cidr": CIDRS[1:]}, provision=False, wait_for_ssh=False)


def the_instance(cloud: Cloud) -> dict[str, Any]:
    [instance] = [i for r in cloud.ec2.describe_instances()["Reservations"] for i in r["Instances"]]
    return instance


def test_ctrl_c_while_ec2_does_not_show_the_new_instance_yet_terminates_it(cli, cloud, monkeypatch):
    """The reviewer's leak: Ctrl-C in the running waiter while DescribeInstances answers NotFound by id and nothing
    by tag. The rollback must look again until EC2 shows the instance, then terminate it."""
    store = in_process(cli, monkeypatch)
    unseen = Unseen(monkeypatch, seconds=2.5)

    def interrupted(self: EC2Driver, waiter: str, instance_id: str, what: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(EC2Driver, "_wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        create_in_process(store, "web1")
    assert unseen.hidden >= 3  # by tag, by id, by client token, at least
    assert the_instance(cloud)["State"]["Name"] == "terminated"
    assert cloud.new_resources() == set() and not stored(cli)


def test_ctrl_c_inside_run_instances_finds_the_launch_by_its_client_token(cli, cloud, monkeypatch):
    """Ctrl-C as RunInstances answers: no instance id journaled; here EC2 shows the instance neither by id nor by
    tag, only to the client-token filter, and the rollback finds it there."""
    store = in_process(cli, monkeypatch)
    Unseen(monkeypatch, seconds=600, except_filters=("client-token",), interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        create_in_process(store, "web1")
    instance = the_instance(cloud)
    assert instance["State"]["Name"] == "terminated" and instance["ClientToken"].startswith("pymachine-")
    assert cloud.new_resources() == set() and not stored(cli)


def test_a_launch_that_never_reached_ec2_is_looked_for_until_visible_timeout_after_it(cli, cloud, monkeypatch):
    """Ctrl-C before RunInstances is sent, its client token journaled: nothing will ever show. The rollback looks
    until VISIBLE_TIMEOUT after the launch, no longer, then removes the rest and the record."""
    store = in_process(cli, monkeypatch)
    monkeypatch.setattr("machine.drivers.ec2.VISIBLE_TIMEOUT", 3.0)

    def unsent(**_: Any) -> None:
        raise KeyboardInterrupt

    hook_clients(monkeypatch, {"before-call.ec2.RunInstances": unsent})
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        create_in_process(store, "web1")
    assert 2.5 < time.monotonic() - began < 30
    assert cloud.new_resources() == set() and not stored(cli)


def test_an_instance_not_visible_yet_is_a_leftover_and_keeps_the_record(cli, cloud, monkeypatch):
    """A launch that never settled (killed before its address was journaled) and that EC2 does not show yet: rm may
    not say "nothing left". Once EC2 shows it, rm -f terminates it."""
    create(cli, "web1", *CIDRS)
    rec = record(cli, "web1")
    instance_id = rec["resources"]["instance_id"]
    journal = cli.home / "machines/web1/journal"
    journal.write_text("".join(line for line in journal.read_text().splitlines(keepends=True) if '"ip"' not in line))
    (cli.home / "machines/web1/config.json").unlink()
    store = in_process(cli, monkeypatch)
    unseen = Unseen(monkeypatch, seconds=600)
    unseen.until = time.monotonic() + 600
    machine = store.recover("web1")
    driver = EC2Driver(machine, store)
    assert f"instance {instance_id} (not yet visible)" in driver.leftovers()

    def unreachable(self: EC2Driver) -> None:  # remove() fails: EC2 unreachable, a second Ctrl-C
        raise MachineError("cannot reach EC2")

    monkeypatch.setattr(EC2Driver, "remove", unreachable)
    with pytest.raises(MachineError, match=re.escape(f"left: instance {instance_id} (not yet visible)")):
        remove_machine(store, machine, driver, force=True)
    assert cloud.instance(instance_id)["State"]["Name"] == "running"

    unseen.until = 0.0  # EC2 shows it now
    cli("rm", "-f", "web1")
    assert cloud.instance(instance_id)["State"]["Name"] == "terminated"
    assert cloud_leftovers(cloud.ec2, rec["id"]) == [] and not stored(cli)


def test_start_right_after_a_killed_create_waits_for_ec2_to_show_the_instance(cli, cloud, monkeypatch):
    """A create killed before the instance's address was journaled, then `start` at once: NotFound from EC2 is
    "not yet", not "terminated"."""
    create(cli, "web1", *CIDRS)
    instance_id = record(cli, "web1")["resources"]["instance_id"]
    store = in_process(cli, monkeypatch)
    unseen = Unseen(monkeypatch, seconds=2.5)
    unseen.until = time.monotonic() + 2.5
    with store.locked("web1") as machine:
        del machine.resources["ip"]  # never settled
        EC2Driver(machine, store).start()
        assert unseen.hidden >= 2
        assert machine.resources["ip"] == cloud.instance(instance_id)["PublicIpAddress"]
    cli("rm", "-y", "web1")


# What create makes by name: (its call, the lookup by name, the lookup's list).
NAMED_KINDS = {"group": ("CreateSecurityGroup", "DescribeSecurityGroups", "SecurityGroups"),
               "key_pair": ("ImportKeyPair", "DescribeKeyPairs", "KeyPairs")}


# Where Ctrl-C comes once the group's (key pair's) id is journaled: as create asks for the next thing; for the key
# pair, as the group made next is answered (a Ctrl-C before CreateSecurityGroup would leave a group asked for that
# never shows, which the rollback waits VISIBLE_TIMEOUT for).
AFTER_ID = {"group": "before-call.ec2.AuthorizeSecurityGroupIngress", "key_pair": "after-call.ec2.CreateSecurityGroup"}


def ec2_error(code: str) -> Any:
    """What a before-call handler returns for EC2 to have answered `code`."""
    from botocore.awsrequest import AWSResponse

    return AWSResponse("", 400, {}, None), {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {}}


class UnseenByName:
    """Eventual consistency of a security group or key pair, played on pymachine's clients: Ctrl-C as `create`
    answers (before the id is journaled; with `interrupt_at`, at that botocore event instead), and for
    `seconds` after it `describe` finds nothing (by id: NotFound), a DeleteKeyPair by name deletes nothing and a
    DeleteSecurityGroup answers InvalidGroup.NotFound, as EC2 may right after the pair or group is made."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kind: str, seconds: float, interrupt: bool = True,
                 interrupt_at: str | None = None) -> None:
        create, describe, self.listed = NAMED_KINDS[kind]
        self.seconds, self.interrupt = seconds, interrupt and not interrupt_at
        self.until = 0.0
        self.hidden = 0
        hooks = {f"after-call.ec2.{create}": self._made, f"before-call.ec2.{describe}": self._describe,
                 "before-call.ec2.DeleteKeyPair": self._delete_pair}
        if kind == "group":
            hooks["before-call.ec2.DeleteSecurityGroup"] = self._delete_group
        if interrupt_at:
            hooks[interrupt_at] = self._interrupt
        hook_clients(monkeypatch, hooks)

    def _made(self, **_: Any) -> None:
        self.until = time.monotonic() + self.seconds
        if self.interrupt:
            raise KeyboardInterrupt

    def _interrupt(self, **_: Any) -> None:
        raise KeyboardInterrupt

    def _unseen(self) -> bool:
        return time.monotonic() < self.until

    def _describe(self, params: dict[str, Any], **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        if not self._unseen():
            return None
        self.hidden += 1
        body = params["body"]
        if any(k.startswith("GroupId.") for k in body):
            return ec2_error("InvalidGroup.NotFound")
        if any(k.startswith(("KeyPairId.", "KeyName.")) for k in body):
            return ec2_error("InvalidKeyPair.NotFound")
        return AWSResponse("", 200, {}, None), {self.listed: [], "ResponseMetadata": {}}

    def _delete_pair(self, **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        return (AWSResponse("", 200, {}, None), {"ResponseMetadata": {}}) if self._unseen() else None

    def _delete_group(self, **_: Any) -> Any:
        if not self._unseen():
            return None
        self.hidden += 1
        return ec2_error("InvalidGroup.NotFound")


@pytest.mark.parametrize("kind", NAMED_KINDS)
def test_ctrl_c_while_ec2_does_not_show_the_new_group_or_key_pair_yet_removes_it(cli, cloud, monkeypatch, kind):
    """Ctrl-C as CreateSecurityGroup (ImportKeyPair) answers: its id never reached the journal, and EC2 does not
    list it by name yet. The rollback looks again until EC2 shows it, then deletes it."""
    store = in_process(cli, monkeypatch)
    unseen = UnseenByName(monkeypatch, kind, seconds=2.5)
    with pytest.raises(KeyboardInterrupt):
        create_in_process(store, "web1")
    assert unseen.hidden >= 2
    assert cloud.new_resources() == set() and not stored(cli)


@pytest.mark.parametrize("kind", NAMED_KINDS)
def test_ctrl_c_after_the_id_was_journaled_while_ec2_does_not_show_it_yet_removes_it(cli, cloud, monkeypatch, kind):
    """Ctrl-C right after the group's (key pair's) id was journaled, while EC2 does not know that id yet: a
    delete by id answers NotFound (by name: deletes nothing), which the rollback must not take for "gone"."""
    store = in_process(cli, monkeypatch)
    unseen = UnseenByName(monkeypatch, kind, seconds=2.5, interrupt_at=AFTER_ID[kind])
    with pytest.raises(KeyboardInterrupt):
        create_in_process(store, "web1")
    assert unseen.hidden >= 2
    assert cloud.new_resources() == set() and not stored(cli)


@pytest.mark.parametrize("ids", ["journaled", "not journaled"])
def test_a_group_or_key_pair_not_visible_yet_is_a_leftover(cli, cloud, monkeypatch, ids):
    """A create killed before the launch (and, or not, before the group's and key pair's ids were journaled),
    while EC2 shows neither by name nor by id: leftovers() says "not yet visible", not gone (so rm keeps the
    record); once EC2 shows them, rm -f removes them."""
    create(cli, "web1", *CIDRS)
    rec = record(cli, "web1")
    journal = cli.home / "machines/web1/journal"
    cut = ("instance_id", '"ip"') + (("group_id", "key_pair_id") if ids == "not journaled" else ())
    journal.write_text("".join(line for line in journal.read_text().splitlines(keepends=True)
                               if not any(word in line for word in cut)))
    (cli.home / "machines/web1/config.json").unlink()
    store = in_process(cli, monkeypatch)
    hidden = [UnseenByName(monkeypatch, kind, 0, interrupt=False) for kind in NAMED_KINDS]
    for unseen in hidden:
        unseen.until = time.monotonic() + 600
    left = EC2Driver(store.recover("web1"), store).leftovers()
    base = f"pymachine-web1-{rec['id']}"
    assert f"security group {base} (not yet visible)" in left and f"key pair {base} (not yet visible)" in left
    for unseen in hidden:
        unseen.until = 0.0  # EC2 shows them now
    cli("rm", "-f", "web1")
    assert cloud_leftovers(cloud.ec2, rec["id"]) == [] and not stored(cli)


# -- create while EC2 takes the instance away, or throttles ------------------------------------------------------
def test_an_instance_ec2_terminates_while_it_starts_is_named_with_ec2s_reason_and_rolled_back(cli, cloud,
                                                                                              monkeypatch):
    """EC2 may terminate a new instance on its own before it runs (no capacity, a KMS key it may not use): the
    create says so, with EC2's reason (not a waiter's JMESPath), and removes the rest."""
    store = in_process(cli, monkeypatch)
    monkeypatch.setitem(WAIT, "Delay", 0.2)

    def capacity_gone(parsed: dict[str, Any], **_: Any) -> None:
        [instance] = parsed["Instances"]
        cloud.ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])

    def reason(parsed: dict[str, Any], **_: Any) -> None:
        for reservation in parsed.get("Reservations", []):
            for instance in reservation["Instances"]:
                if instance["State"]["Name"] == "terminated":
                    instance["StateReason"] = {"Code": "Server.InsufficientInstanceCapacity",
                                               "Message": "Server.InsufficientInstanceCapacity: Insufficient capacity."}

    hook_clients(monkeypatch, {"after-call.ec2.RunInstances": capacity_gone,
                               "after-call.ec2.DescribeInstances": reason})
    with pytest.raises(MachineError) as raised:
        create_in_process(store, "web1")
    instance_id = the_instance(cloud)["InstanceId"]
    assert str(raised.value) == (f"web1 ({instance_id}) is terminated, not running: "
                                 f"Server.InsufficientInstanceCapacity: Insufficient capacity.")
    assert cloud.new_resources() == set() and not stored(cli)


def test_a_throttled_look_while_the_instance_starts_is_no_reason_to_give_it_up(cli, cloud, monkeypatch):
    """RequestLimitExceeded (after boto3's own retries) while create waits for `running`: it asks again later,
    instead of failing the create and terminating a good instance."""
    store = in_process(cli, monkeypatch)
    monkeypatch.setitem(WAIT, "Delay", 0.2)
    throttled = [ec2_error("RequestLimitExceeded") for _ in range(3)]
    hook_clients(monkeypatch, {"before-call.ec2.DescribeInstances": lambda **_: throttled.pop() if throttled else None})
    create_in_process(store, "web1")
    assert not throttled
    instance = the_instance(cloud)
    assert instance["State"]["Name"] == "running"
    assert record(cli, "web1")["resources"]["ip"] == instance["PublicIpAddress"]


def test_calls_naming_the_new_group_or_key_pair_before_ec2_shows_it_are_made_again(cli, cloud, monkeypatch):
    """Right after CreateSecurityGroup and ImportKeyPair, EC2 may refuse a call naming them (InvalidGroup.NotFound,
    InvalidKeyPair.NotFound): create asks again until they must show, and no longer."""
    store = in_process(cli, monkeypatch)
    monkeypatch.setattr("machine.drivers.ec2.VISIBLE_DELAY", 0.1)
    refusals = {"AuthorizeSecurityGroupIngress": ["InvalidGroup.NotFound"] * 2,
                "RunInstances": ["InvalidKeyPair.NotFound", "InvalidGroup.NotFound"]}

    def refused(model: Any, **_: Any) -> Any:
        codes = refusals[model.name]
        return ec2_error(codes.pop(0)) if codes else None

    hook_clients(monkeypatch, {f"before-call.ec2.{action}": refused for action in refusals})
    create_in_process(store, "web1")
    assert refusals == {"AuthorizeSecurityGroupIngress": [], "RunInstances": []}
    assert the_instance(cloud)["State"]["Name"] == "running"
    cli("rm", "-y", "web1")

    # A group EC2 never shows: asked again until VISIBLE_TIMEOUT after create asked for it, then the create fails.
    store = in_process(cli, monkeypatch)
    monkeypatch.setattr("machine.drivers.ec2.VISIBLE_TIMEOUT", 2.0)
    refusals["AuthorizeSecurityGroupIngress"] = ["InvalidGroup.NotFound"] * 1000
    began = time.monotonic()
    with pytest.raises(MachineError, match=r"opening ports 22 and 2376 of pymachine-web2-\w+: InvalidGroup.NotFound"):
        create_in_process(store, "web2")
    assert 1.0 < time.monotonic() - began < 30
    assert cloud.new_resources() == set() and not stored(cli)


def test_a_throttled_look_while_rm_waits_for_the_termination_is_asked_again(cli, cloud, monkeypatch):
    """RequestLimitExceeded (after boto3's own retries) while rm waits for `terminated`: asked again, not a failed
    step that then waits minutes for the group the instance still holds and keeps the record."""
    create(cli, "web1", *CIDRS)
    store = in_process(cli, monkeypatch)
    monkeypatch.setitem(WAIT, "Delay", 0.2)
    throttled = [ec2_error("RequestLimitExceeded") for _ in range(2)]

    def termination_throttled(params: dict[str, Any], **_: Any) -> Any:
        if "instance-id" in params["body"].values() and throttled:
            return throttled.pop()
        return None

    hook_clients(monkeypatch, {"before-call.ec2.DescribeInstances": termination_throttled})
    with store.locked("web1") as machine:
        EC2Driver(machine, store).remove()
    assert not throttled
    assert cloud.new_resources() == set()
    cli("rm", "-y", "web1")


# -- rm waits for `terminated` through the states on the way ----------------------------------------------------
def test_rm_waits_through_stopping_and_pending_until_terminated(cli, cloud, monkeypatch):
    """boto3's instance_terminated waiter gives up at the first `pending` or `stopping` it reads; rm polls until
    `terminated`, and says so when the time (WAIT) runs out."""
    create(cli, "web1", *CIDRS)
    create(cli, "web2", *CIDRS)
    store = in_process(cli, monkeypatch)
    monkeypatch.setitem(WAIT, "Delay", 0.2)
    monkeypatch.setitem(WAIT, "MaxAttempts", 10)
    lagging = ["stopping", "pending"]  # what EC2 still shows, one answer each, after the terminate

    def lag(parsed: dict[str, Any], **_: Any) -> None:
        for reservation in parsed.get("Reservations", []):
            for instance in reservation["Instances"]:
                if instance["State"]["Name"] == "terminated" and lagging:
                    instance["State"]["Name"] = lagging.pop(0)

    hook_clients(monkeypatch, {"after-call.ec2.DescribeInstances": lag})
    with store.locked("web1") as machine:
        EC2Driver(machine, store).remove()
    assert not lagging and cloud.instance(record(cli, "web1")["resources"]["instance_id"])["State"]["Name"] == \
        "terminated"

    lagging[:] = ["stopping"] * 100
    with store.locked("web2") as machine, pytest.raises(MachineError, match=r"\(stopping\) not terminated after 2s"):
        EC2Driver(machine, store).remove()
