"""The EC2 driver without EC2: its options, the checks that need no API call, the user-data it launches with,
the security group rules it asks for, and the names the engine's certificate carries."""

from __future__ import annotations

import re
import socket
import sys
import time

import pytest
import yaml

from machine import cloudinit, drivers, sshkeys
from machine.commands.machines import parse_driver_options
from machine.drivers.base import ENGINE_PORT, Option, State
from machine.drivers.ec2 import (
    EC2Driver,
    _check_values,
    api,
    check_endpoint,
    ingress,
    parse_tags,
    poll,
    port_answers,
    wait_port_down,
)
from machine.errors import MachineError, UsageError
from machine.store import Machine, Store

KEY = "ssh-ed25519 AAAAuser pymachine@web1"


def values(**overrides) -> dict:
    base = {o.key: o.default for o in EC2Driver.options} | {"ec2_security_group": [], "ec2_allowed_cidr": [],
                                                            "ec2_tags": []}
    return base | overrides


def test_the_driver_is_registered_with_docker_machines_option_names():
    assert drivers.get("ec2") is EC2Driver
    names = {o.name for o in EC2Driver.options}
    assert {"ec2-region", "ec2-zone", "ec2-instance-type", "ec2-ami", "ec2-vpc-id", "ec2-subnet-id",
            "ec2-security-group", "ec2-allowed-cidr", "ec2-root-size", "ec2-volume-type", "ec2-volume-encrypted",
            "ec2-kms-key", "ec2-tags", "ec2-spot", "ec2-spot-max-price", "ec2-use-private-address",
            "ec2-iam-instance-profile", "ec2-ssh-user", "ec2-endpoint", "ec2-profile", "ec2-iops"} <= names
    by_name: dict[str, Option] = {o.name: o for o in EC2Driver.options}
    assert by_name["ec2-region"].env_alias == "AWS_DEFAULT_REGION"
    assert by_name["ec2-profile"].env_alias == "AWS_PROFILE"
    assert {o.name for o in EC2Driver.options if o.multiple} == {"ec2-security-group", "ec2-allowed-cidr",
                                                                 "ec2-tags"}
    assert {o.name for o in EC2Driver.options if o.secret} == {"ec2-access-key", "ec2-secret-key"}
    assert by_name["ec2-ssh-user"].default == "admin"


def test_keys_given_on_the_command_line_are_never_recorded(monkeypatch):
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    parsed = parse_driver_options("ec2", {"ec2_access_key": "AKIAEXAMPLE", "ec2_secret_key": "s3cret",
                                          "ec2_allowed_cidr": ("10.0.0.0/8",)})
    recorded, secrets = EC2Driver.split_secrets(parsed)
    assert secrets == {"ec2_access_key": "AKIAEXAMPLE", "ec2_secret_key": "s3cret"}
    assert "s3cret" not in repr(recorded) and recorded["ec2_allowed_cidr"] == ["10.0.0.0/8"]


def test_the_ssh_user_is_the_option(tmp_path):
    machine = Machine(name="web1", driver="ec2", id="0123abcd", dir=tmp_path, options={"ec2_ssh_user": "deploy"})
    assert EC2Driver(machine, Store(tmp_path), {}).ssh_user == "deploy"
    machine.options = {}
    assert EC2Driver(machine, Store(tmp_path), {}).ssh_user == "admin"


@pytest.mark.parametrize(("overrides", "message"), [
    ({}, "--ec2-allowed-cidr is required"),
    ({"ec2_allowed_cidr": ["10.0.0.0/8"], "ec2_security_group": ["sg-1"]}, "open ports 22 and 2376 in your group"),
    ({"ec2_allowed_cidr": ["10.0.0.1/8"]}, "has host bits set"),
    ({"ec2_allowed_cidr": ["everyone"]}, "does not appear to be an IPv4 or IPv6 network"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_root_size": 0}, "0 is less than 1 GiB, the least of a gp3 volume"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_root_size": 65537}, "65537 is more than 65536 GiB, the most of a gp3"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_volume_type": "standard", "ec2_root_size": 2000},
     "2000 is more than 1024 GiB, the most of a standard volume"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_volume_type": "io1", "ec2_iops": 100, "ec2_root_size": 2},
     "2 is less than 4 GiB, the least of a io1 volume"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_spot_max_price": "0.1"}, "needs --ec2-spot"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_spot": True, "ec2_spot_max_price": "-1"}, "not a positive price"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_spot": True, "ec2_spot_max_price": "cheap"}, "not a positive price"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_spot": True, "ec2_spot_max_price": "1e-2"}, "not a positive price"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_spot": True, "ec2_spot_max_price": " 0.5 "}, "not a positive price"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_spot": True, "ec2_spot_max_price": "0"}, "not a positive price"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_tags": ["novalue"]}, "use KEY=VALUE"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_tags": ["aws:x=1"]}, "reserved"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_tags": ["pymachine-machine-id=1"]}, "reserved"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_endpoint": "127.0.0.1:5000"}, "not an http(s) URL"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_endpoint": "http://"}, "'http://' names no host"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_endpoint": "http://exa mple"}, "no valid host name ('exa mple')"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_endpoint": "http://127.0.0.1:99999"}, "no valid port (1-65535)"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_endpoint": "https://h:0"}, "no valid port (1-65535)"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_volume_type": "io1"}, "--ec2-volume-type io1 needs --ec2-iops"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_volume_type": "io2"}, "--ec2-volume-type io2 needs --ec2-iops"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_iops": 3000}, "--ec2-iops is for --ec2-volume-type io1 or io2 only, "
                                                            "not gp3"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_volume_type": "io2", "ec2_iops": 50}, "50 is less than 100"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_volume_type": "io2", "ec2_iops": 10000000, "ec2_root_size": 65536},
     "10000000 is more than 256000, the most of a io2 volume"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_volume_type": "io1", "ec2_iops": 3000},
     "3000 is more than 50 per GiB of the 16 GiB root volume (io1)"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_ssh_user": "Bad User;x"}, "--ec2-ssh-user: 'Bad User;x' is not a user"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_ssh_user": "-oProxyCommand=x"}, "'-oProxyCommand=x' is not a user"),
    ({"ec2_allowed_cidr": ["0.0.0.0/0"], "ec2_ssh_user": ""}, "--ec2-ssh-user: '' is not a user name"),
])
def test_values_refused_before_any_api_call(overrides, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _check_values(values(**overrides))


def test_an_explicit_everyone_and_ipv6_are_accepted():
    _check_values(values(ec2_allowed_cidr=["0.0.0.0/0", "::/0"]))
    _check_values(values(ec2_security_group=["sg-0123"]))


@pytest.mark.parametrize("url", ["https://ec2.us-east-1.amazonaws.com", "http://127.0.0.1:5000",
                                 "http://[::1]:5000/", "https://ec2.example.org:8443/path"])
def test_endpoints_botocore_can_use_are_accepted(url):
    check_endpoint(url)


def test_io_volumes_take_their_iops_within_ebs_limits():
    for volume_type, iops in (("io1", 800), ("io2", 16000)):  # 50 and 1000 per GiB of the default 16 GiB
        _check_values(values(ec2_allowed_cidr=["0.0.0.0/0"], ec2_volume_type=volume_type, ec2_iops=iops))
    _check_values(values(ec2_allowed_cidr=["0.0.0.0/0"], ec2_volume_type="io1", ec2_iops=64000, ec2_root_size=1280))
    _check_values(values(ec2_allowed_cidr=["0.0.0.0/0"], ec2_spot=True, ec2_spot_max_price=".5"))


def test_the_iops_go_with_the_root_volume(tmp_path):
    """(moto's RunInstances drops a mapping's Iops, and so refuses io1 and io2: the request is checked here.)"""
    found = {"ami": "ami-1", "root_device": "/dev/xvda", "subnet": None}
    for iops in (4000, None):
        machine = Machine(name="web1", driver="ec2", id="0123abcd", dir=tmp_path,
                          options={"ec2_volume_type": "io2" if iops else "gp3", "ec2_iops": iops})
        spec = EC2Driver(machine, Store(tmp_path), {})._launch(found, ["sg-1"], "#cloud-config\n", "token")
        [mapping] = spec["BlockDeviceMappings"]
        assert mapping["Ebs"].get("Iops") == iops and mapping["Ebs"]["VolumeType"] == ("io2" if iops else "gp3")


def test_hdd_volume_types_cannot_be_chosen_for_the_root_volume():
    [option] = [o for o in EC2Driver.options if o.name == "ec2-volume-type"]
    for volume_type in ("st1", "sc1"):
        with pytest.raises(UsageError, match=f"--ec2-volume-type: '{volume_type}' is not one of gp3, gp2, io1, io2, "
                                             f"standard"):
            option.parse(volume_type)


def test_poll_stops_when_done_or_at_its_timeout_backing_off(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    answers = iter(range(10))
    assert poll(lambda: next(answers), lambda n: n == 3, 60.0, 1.0, 4.0) == 3
    assert slept == [1.0, 2.0, 4.0]  # doubled, up to the maximum
    began = time.monotonic()
    monkeypatch.undo()
    assert poll(lambda: "not yet", lambda _: False, 0.3, 0.1) == "not yet"  # the last answer, after the timeout
    assert 0.3 <= time.monotonic() - began < 2


def test_tags_parse():
    assert parse_tags(["team=web", "empty=", "eq=a=b"]) == {"team": "web", "empty": "", "eq": "a=b"}


def test_the_group_opens_ssh_and_the_engine_to_the_allowed_cidrs_only():
    rules = ingress(["203.0.113.7/32", "2001:db8::/48"])
    assert rules == [
        {"IpProtocol": "tcp", "FromPort": port, "ToPort": port,
         "IpRanges": [{"CidrIp": "203.0.113.7/32", "Description": "pymachine"}],
         "Ipv6Ranges": [{"CidrIpv6": "2001:db8::/48", "Description": "pymachine"}]}
        for port in (22, 2376)]


def test_the_certificate_names_every_address_once(tmp_path):
    machine = Machine(name="web1", driver="ec2", id="0123abcd", dir=tmp_path, resources={
        "ip": "54.1.2.3", "public_ip": "54.1.2.3", "private_ip": "10.0.0.5",
        "public_dns": "ec2-54-1-2-3.compute-1.amazonaws.com", "private_dns": "ip-10-0-0-5.ec2.internal"})
    assert EC2Driver(machine, Store(tmp_path), {}).cert_names() == [
        "54.1.2.3", "10.0.0.5", "ec2-54-1-2-3.compute-1.amazonaws.com", "ip-10-0-0-5.ec2.internal"]
    machine.resources = {"ip": "10.0.0.5", "public_ip": "", "private_ip": "10.0.0.5", "public_dns": "",
                         "private_dns": ""}
    assert EC2Driver(machine, Store(tmp_path), {}).cert_names() == ["10.0.0.5"]


# -- the shared cloud-init user-data, as EC2 launches it --------------------------------------------------------
def test_ec2_user_data_makes_the_user_with_sudo_our_key_and_the_pinned_host_key():
    host = sshkeys.new_keypair("root@web1")
    text = cloudinit.user_data("web1", "admin", KEY, host)
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["hostname"] == "web1"
    assert data["disable_root"] is True and "ssh_authorized_keys" not in data  # root gets no key
    assert data["users"] == [{"name": "admin", "shell": "/bin/bash", "lock_passwd": True,
                              "sudo": "ALL=(ALL) NOPASSWD:ALL", "ssh_authorized_keys": [KEY]}]
    assert data["ssh_keys"] == {"ed25519_private": host.private_openssh.decode(),
                                "ed25519_public": host.public_line}
    assert data["ssh_genkeytypes"] == ["ed25519"] and data["ssh_deletekeys"] is True
    assert len(text.encode()) < 16 * 1024  # EC2's limit on user-data


def test_root_user_data_is_what_libvirt_boots_with():
    host = sshkeys.new_keypair()
    data = yaml.safe_load(cloudinit.user_data("web1", "root", KEY, host))
    assert data["disable_root"] is False and data["ssh_authorized_keys"] == [KEY] and "users" not in data


def test_a_user_name_cannot_break_out_of_the_yaml():
    host = sshkeys.new_keypair()
    data = yaml.safe_load(cloudinit.user_data("web1", 'admin"\nruncmd: [reboot]', KEY, host))
    assert "runcmd" not in data and data["users"][0]["name"] == 'admin"\nruncmd: [reboot]'


# -- boto3 missing: the install hint, from every entry ---------------------------------------------------------
HINT = "pip install 'pymachine[ec2]'"


def test_without_boto3_every_entry_gives_the_install_hint(tmp_path, monkeypatch):
    for module in ("boto3", "botocore", "botocore.config", "botocore.exceptions", "botocore.parsers"):
        monkeypatch.setitem(sys.modules, module, None)  # `import boto3` raises ImportError
    monkeypatch.setattr(api, "_CLIENTS", {})
    monkeypatch.setattr(api, "_SESSIONS", {})
    monkeypatch.setattr(api, "_ACCOUNTS", {})
    with pytest.raises(MachineError, match=re.escape(HINT)), api.translated("anything"):
        pass
    for region in ("us-east-1", None):
        with pytest.raises(MachineError, match=re.escape(HINT)):
            EC2Driver.pre_create_check(values(ec2_allowed_cidr=["10.0.0.0/8"], ec2_region=region))
    machine = Machine(name="web1", driver="ec2", id="0123abcd", dir=tmp_path,
                      resources={"region": "us-east-1", "instance_id": "i-1", "account": "123456789012"})
    driver = EC2Driver(machine, Store(tmp_path), {})
    with pytest.raises(MachineError, match=re.escape(HINT)):
        driver.remove()
    [left] = driver.leftovers()
    assert left.startswith("unknown (") and HINT in left
    assert driver.state() == State.ERROR


# -- restart: waiting for SSH to go down -----------------------------------------------------------------------
def test_wait_port_down_returns_when_the_port_closes_and_gives_up_after_its_timeout():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert port_answers("127.0.0.1", port)
        began = time.monotonic()
        with pytest.raises(MachineError, match=f"web1 was asked to reboot, but SSH at 127.0.0.1:{port} still "
                                               f"answers after 1s"):
            wait_port_down("127.0.0.1", port, 1.0, "web1")
        assert time.monotonic() - began < 5
    assert not port_answers("127.0.0.1", port)
    wait_port_down("127.0.0.1", port, 1.0, "web1")  # closed: returns at once


def test_the_engine_port_is_the_base_drivers():
    import machine.drivers.ec2 as ec2

    assert not hasattr(ec2, "ENGINE_PORT") or ec2.ENGINE_PORT is ENGINE_PORT
    assert ingress(["10.0.0.0/8"])[1]["FromPort"] == ENGINE_PORT
