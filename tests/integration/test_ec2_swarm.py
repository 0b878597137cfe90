"""The EC2 driver's swarm ports, through its hooks and real boto3, against the moto server of test_ec2.

A join opens 2377/tcp, 7946/tcp+udp and 4789/udp between the machines' security groups (rules naming the peers'
groups, never a CIDR); a leave takes them back; `rm` revokes the rules naming a removed machine's group, which
EC2 would otherwise keep from being deleted. moto's instances run no engine: the hooks are called directly.
"""

from __future__ import annotations

from typing import Any

import pytest

from machine.drivers.ec2 import EC2Driver
from machine.drivers.ec2.swarm import SWARM_PORTS
from machine.drivers.generic import GenericDriver
from tests.integration.test_ec2 import CIDRS, cli, cloud, create, in_process, moto, record  # noqa: F401

pytestmark = pytest.mark.integration


def peer_rules(ec2: Any, group_id: str) -> set[tuple[str, int, str]]:
    """(protocol, port, source group) of every rule of the group whose source is another group."""
    [group] = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    return {(p["IpProtocol"], p["FromPort"], pair["GroupId"])
            for p in group["IpPermissions"] for pair in p.get("UserIdGroupPairs", [])}


def cidr_rules(ec2: Any, group_id: str) -> set[tuple[str, int, str]]:
    [group] = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    return {(p["IpProtocol"], p["FromPort"], r["CidrIp"])
            for p in group["IpPermissions"] for r in p.get("IpRanges", [])}


def from_groups(*sources: str) -> set[tuple[str, int, str]]:
    return {(protocol, port, source) for source in sources for protocol, port in SWARM_PORTS}


def test_swarm_ports_open_between_peers_groups_and_close_on_leave_and_rm(cli, cloud, monkeypatch):  # noqa: F811
    names = ("m1", "m2", "m3")
    for name in names:
        create(cli, name, *CIDRS)
    store = in_process(cli, monkeypatch)
    m1, m2, m3 = (EC2Driver(store.load(name), store) for name in names)
    g1, g2, g3 = (record(cli, name)["resources"]["group_id"] for name in names)
    before = cidr_rules(cloud.ec2, g1)
    # Peers reach each other inside the VPC, where rules naming their groups apply.
    assert m2.swarm_address() == record(cli, "m2")["resources"]["private_ip"] != record(cli, "m2")["resources"]["ip"]

    m2.open_swarm_ports([m1])  # m2 joins the swarm m1 manages
    assert peer_rules(cloud.ec2, g1) == from_groups(g2) and peer_rules(cloud.ec2, g2) == from_groups(g1)
    assert peer_rules(cloud.ec2, g3) == set()
    m3.open_swarm_ports([m1, m2])
    assert peer_rules(cloud.ec2, g1) == from_groups(g2, g3)
    assert peer_rules(cloud.ec2, g2) == from_groups(g1, g3)
    assert peer_rules(cloud.ec2, g3) == from_groups(g1, g2)
    assert cidr_rules(cloud.ec2, g1) == before  # the allowed CIDRs still reach only SSH and the engine

    cloud.server.recording.write_text("")
    m3.open_swarm_ports([m1, m2])  # a second join asks for nothing EC2 would refuse as a duplicate
    assert cloud.server.actions()["AuthorizeSecurityGroupIngress"] == 0

    m2.close_swarm_ports([m1, m3])  # m2 leaves
    assert peer_rules(cloud.ec2, g2) == set()
    assert peer_rules(cloud.ec2, g1) == from_groups(g3) and peer_rules(cloud.ec2, g3) == from_groups(g1)

    cli("rm", "-y", "m3")  # its group is still named by m1's: rm takes those rules away, then the group
    assert peer_rules(cloud.ec2, g1) == set()
    assert not cloud.ec2.describe_security_groups(Filters=[{"Name": "group-id", "Values": [g3]}])["SecurityGroups"]


def test_a_machine_in_groups_of_its_own_gets_no_rules_and_a_warning(cli, cloud, monkeypatch, capsys):  # noqa: F811
    create(cli, "m1", *CIDRS)
    vpc = cloud.ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    mine = cloud.ec2.create_security_group(GroupName="mine", Description="the user's", VpcId=vpc)["GroupId"]
    create(cli, "m2", "--ec2-security-group", mine)
    store = in_process(cli, monkeypatch)
    m1, m2 = (EC2Driver(store.load(name), store) for name in ("m1", "m2"))
    m2.open_swarm_ports([m1])
    assert peer_rules(cloud.ec2, mine) == set()
    assert peer_rules(cloud.ec2, record(cli, "m1")["resources"]["group_id"]) == set()
    assert "open the swarm ports (2377/tcp, 7946/tcp+udp, 4789/udp)" in capsys.readouterr().err


def test_peers_no_rule_can_name_are_named_in_one_warning(cli, cloud, monkeypatch, capsys):  # noqa: F811
    """A peer in groups of the user's own, or in another region, gets no rule: the joining machine names it and the
    ports to open, in one line, and still opens the ports to the peers it can name."""
    for name in ("m1", "m3"):
        create(cli, name, *CIDRS)
    create(cli, "w1", *CIDRS, "--ec2-region", "us-west-2")
    vpc = cloud.ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    mine = cloud.ec2.create_security_group(GroupName="mine", Description="the user's", VpcId=vpc)["GroupId"]
    create(cli, "m2", "--ec2-security-group", mine)
    store = in_process(cli, monkeypatch)
    m1, m2, m3, w1 = (EC2Driver(store.load(name), store) for name in ("m1", "m2", "m3", "w1"))
    g1, g3 = (record(cli, name)["resources"]["group_id"] for name in ("m1", "m3"))
    with store.reserve("h1", "generic", {"generic_ip_address": "192.0.2.7"}) as adopted:  # only recorded
        h1 = GenericDriver(adopted, store)
    capsys.readouterr()
    m1.open_swarm_ports([m2, m3, w1, h1])
    assert peer_rules(cloud.ec2, g1) == from_groups(g3) and peer_rules(cloud.ec2, g3) == from_groups(g1)
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("pymachine: warning: no swarm rules between m1 and m2, w1, h1 (")
    assert line.endswith("open the swarm ports (2377/tcp, 7946/tcp+udp, 4789/udp) between them yourself")
