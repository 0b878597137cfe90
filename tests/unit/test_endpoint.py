import pytest

from machine.endpoint import Endpoint, host_of, host_port, is_host, is_ip, normal_host


@pytest.mark.parametrize("host", ["10.0.0.5", "web1.example", "2001:db8::5", "::1", "fe80::1"])
def test_a_host_comes_back_out_of_host_port(host):
    # A swarm's RemoteManagers are "HOST:PORT" with an IPv6 host in brackets: the swarm's manager is found by it.
    assert host_of(host_port(host, 2377)) == host


def test_host_port_brackets_ipv6_only():
    assert host_port("2001:db8::5", 2377) == "[2001:db8::5]:2377"
    assert host_port("10.0.0.5", 2377) == "10.0.0.5:2377"
    assert Endpoint("::1", 2222).where == "[::1]:2222"
    assert Endpoint("::1").known_hosts_name == "::1"


def test_an_address_with_a_zone_is_no_ip():
    assert is_ip("fe80::1") and not is_ip("fe80::1%eth0") and not is_host("fe80::1%eth0")


def test_normal_host_gives_an_address_its_canonical_form():
    assert normal_host("2001:DB8::05") == "2001:db8::5"
    assert normal_host("Web1.example") == "Web1.example"
