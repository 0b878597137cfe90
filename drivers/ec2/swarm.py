"""Swarm ports between EC2 machines: security-group rules that name the peers' groups, never a CIDR.

A rule whose source is a group admits only instances in that group, over their private addresses: the swarm's
managers (2377/tcp), gossip (7946/tcp+udp) and VXLAN (4789/udp, unauthenticated) stay closed to everyone else.
"""

from __future__ import annotations

from typing import Any

from machine.drivers.ec2.api import EC2Error, translated

SWARM_PORTS = (("tcp", 2377), ("tcp", 7946), ("udp", 7946), ("udp", 4789))
# SWARM_PORTS as a user opens them: 2377/tcp, 7946/tcp+udp, 4789/udp
PORTS_TEXT = ", ".join(f"{port}/{'+'.join(proto for proto, p in SWARM_PORTS if p == port)}"
                       for port in dict.fromkeys(p for _, p in SWARM_PORTS))
DESCRIPTION = "pymachine swarm"


def _describe(ec2: Any, **query: Any) -> list[dict[str, Any]]:
    with translated("reading security groups"):
        return ec2.describe_security_groups(**query)["SecurityGroups"]


def _rules_naming(group: dict[str, Any], source: str | None, ports_only: bool) -> list[dict[str, Any]]:
    """The rules of `group` whose source is the group `source` (any group when None), one permission each; only
    those of the swarm ports with `ports_only`."""
    found = []
    for perm in group.get("IpPermissions", []):
        key = (perm.get("IpProtocol"), perm.get("FromPort"))
        if ports_only and (key not in SWARM_PORTS or perm.get("ToPort") != perm.get("FromPort")):
            continue
        for pair in perm.get("UserIdGroupPairs", []):
            if source is None or pair.get("GroupId") == source:
                # The pair as described (owner, description): some EC2-compatible APIs match a revoke on all of it.
                named = {k: v for k, v in pair.items() if k in ("GroupId", "UserId", "Description")}
                found.append({"IpProtocol": perm["IpProtocol"], "FromPort": perm.get("FromPort"),
                              "ToPort": perm.get("ToPort"), "UserIdGroupPairs": [named]})
    return [{k: v for k, v in rule.items() if v is not None} for rule in found]


def allow(ec2: Any, group_id: str, source_id: str) -> None:
    """Open the swarm ports of `group_id` to the instances of `source_id`: only the rules still missing, so that a
    second join (or a retried one) asks nothing EC2 would refuse as a duplicate."""
    group = _describe(ec2, GroupIds=[group_id])[0]
    present = {(r["IpProtocol"], r["FromPort"]) for r in _rules_naming(group, source_id, ports_only=True)}
    missing = [{"IpProtocol": protocol, "FromPort": port, "ToPort": port,
                "UserIdGroupPairs": [{"GroupId": source_id, "Description": DESCRIPTION}]}
               for protocol, port in SWARM_PORTS if (protocol, port) not in present]
    if missing:
        with translated(f"opening the swarm ports of {group_id} to {source_id}"):
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=missing)


def _revoke(ec2: Any, group_id: str, rules: list[dict[str, Any]]) -> None:
    if rules:
        with translated(f"closing ports of {group_id}"):
            ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=rules)


def close(ec2: Any, group_id: str) -> None:
    """Take back every swarm-port rule between `group_id` and other groups, in both directions: the machine's own
    group admits no peer any more, and no peer's group admits it."""
    try:
        own = _describe(ec2, GroupIds=[group_id])
    except EC2Error as e:
        if e.code == "InvalidGroup.NotFound":
            return
        raise
    _revoke(ec2, group_id, _rules_naming(own[0], None, ports_only=True))
    for other in _describe(ec2, Filters=[{"Name": "ip-permission.group-id", "Values": [group_id]}]):
        if other["GroupId"] != group_id:
            _revoke(ec2, other["GroupId"], _rules_naming(other, group_id, ports_only=True))


def forget(ec2: Any, group_id: str) -> None:
    """Revoke every rule of another group that names `group_id`: EC2 refuses to delete a group still named."""
    for other in _describe(ec2, Filters=[{"Name": "ip-permission.group-id", "Values": [group_id]}]):
        if other["GroupId"] != group_id:
            _revoke(ec2, other["GroupId"], _rules_naming(other, group_id, ports_only=False))
