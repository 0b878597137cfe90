import pytest

from machine import commands
from machine.drivers.base import Option
from machine.drivers.local import network
from machine.drivers.local.network import Network
from machine.errors import UsageError


def test_option_parsing_types_env_and_choices(monkeypatch):
    assert Option("x-count", "", 2, int).parse("5") == 5
    assert Option("x-flag", "", False, bool).parse("yes") is True
    monkeypatch.setenv("PYMACHINE_X_COUNT", "7")
    assert Option("x-count", "", 2, int).parse(None) == 7
    with pytest.raises(UsageError, match="--x-count: 'many' is not a valid int"):
        Option("x-count", "", 2, int).parse("many")
    with pytest.raises(UsageError, match="not one of"):
        Option("x-mode", "", "a", choices=("a", "b")).parse("c")


def test_repeatable_options_aliases_and_secrets(monkeypatch):
    tags = Option("x-tag", "", type=str, multiple=True)
    assert tags.parse(()) == [] and tags.parse(("a=1", "b=2")) == ["a=1", "b=2"]
    monkeypatch.setenv("PYMACHINE_X_TAG", "a=1,b=2")
    assert tags.parse(()) == ["a=1", "b=2"]
    with pytest.raises(UsageError, match="--x-port: 'http' is not a valid int"):
        Option("x-port", "", type=int, multiple=True).parse(("22", "http"))
    region = Option("x-region", "", "us-east-1", env_alias="X_DEFAULT_REGION")
    monkeypatch.setenv("X_DEFAULT_REGION", "eu-west-3")
    assert region.parse(None) == "eu-west-3"
    monkeypatch.setenv("PYMACHINE_X_REGION", "eu-north-1")  # pymachine's own variable comes first
    assert region.parse(None) == "eu-north-1"
    monkeypatch.setenv("PYMACHINE_X_REGION", "")
    with pytest.raises(UsageError, match="PYMACHINE_X_REGION"):
        Option("x-region", "", choices=("a",)).parse(None)


def test_driver_options_get_defaults_and_refuse_foreign_flags():
    values = commands.parse_driver_options("local", {"local_subnet": "10.9.0.0/24"})
    assert values["local_subnet"] == "10.9.0.0/24" and values["local_release"] == "bookworm"
    with pytest.raises(UsageError, match="--libvirt-cpus is not an option of the local driver"):
        commands.parse_driver_options("local", {"libvirt_cpus": "2"})
    with pytest.raises(UsageError, match="unknown driver 'nope'"):
        commands.parse_driver_options("nope", {})


@pytest.mark.parametrize(
    ("bridge", "subnet", "message"),
    [
        ("pmbr0", "10.1.2.3/24", "host bits set"),
        ("pmbr0", "10.1.2.0/30", "too small"),
        ("pmbr0", "nonsense", "--local-subnet"),
        ("a-name-much-too-long", "10.1.2.0/24", "--local-bridge"),
        ("bad name", "10.1.2.0/24", "--local-bridge"),
    ],
)
def test_network_validation(bridge, subnet, message):
    with pytest.raises(UsageError, match=message):
        Network.parse(bridge, subnet)


def test_network_gateway_is_the_first_address():
    assert str(Network.parse("pmbr0", "10.231.0.0/24").gateway) == "10.231.0.1"


def test_a_bridge_is_told_by_its_mac_and_type_even_while_the_kernel_is_still_adding_it(tmp_path, monkeypatch):
    """A parallel create that looks the moment after another made the bridge finds its MAC and type, and no
    `bridge` directory yet (sysfs adds it a moment later): that bridge is pymachine's, not the host's."""
    monkeypatch.setattr(network, "SYS_NET", tmp_path)
    ours = Network.parse("pmbr0", "10.231.0.0/24")
    ours.check_free()  # no such interface
    link = tmp_path / "pmbr0"
    link.mkdir()
    (link / "address").write_text(ours.mac + "\n")
    (link / "uevent").write_text("DEVTYPE=bridge\nINTERFACE=pmbr0\nIFINDEX=7\n")
    ours.check_free()
    for address, uevent in ((ours.mac, "INTERFACE=pmbr0\n"), ("52:54:00:12:34:56", "DEVTYPE=bridge\n")):
        (link / "address").write_text(address + "\n")
        (link / "uevent").write_text(uevent)
        with pytest.raises(UsageError, match="the host's interface pmbr0 was not made by pymachine"):
            ours.check_free()


def test_filters():
    assert commands.parse_filters(["name=web*", "state=Running", "name=db"]) == {
        "name": ["web*", "db"], "state": ["Running"],
    }
    with pytest.raises(UsageError):
        commands.parse_filters(["colour=red"])
