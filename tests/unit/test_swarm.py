"""Swarm joins, without engines: where a joining engine is sent."""

from __future__ import annotations

from types import SimpleNamespace

from machine.commands.swarm import _join_address


def test_a_join_is_sent_to_the_named_manager_whatever_the_order_of_its_managers():
    """The engine asks only the first address of a join; the list another manager heads may name one that is down."""
    swarm = {"NodeID": "n2", "NodeAddr": "10.0.0.6",
             "RemoteManagers": [{"NodeID": "n1", "Addr": "10.0.0.5:2377"}, {"NodeID": "n2", "Addr": "10.0.0.6:2377"}]}
    assert _join_address(SimpleNamespace(host="10.0.0.9"), swarm) == "10.0.0.6:2377"
    assert _join_address(SimpleNamespace(host="10.0.0.9"), {"NodeID": "n2", "NodeAddr": "10.0.0.6"}) == "10.0.0.6:2377"
