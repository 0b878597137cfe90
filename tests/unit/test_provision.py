import pytest

from machine import provision
from machine.errors import UsageError


def test_flags_map_to_role_variables():
    config = provision.engine_config(
        storage_driver="vfs", opts=("max-concurrent-downloads=5", "debug=true", "log-level=warn"),
        labels=("team=ops",), env=("HTTP_PROXY=http://127.0.0.1:3128",), bip="10.250.7.1/24",
        address_pools=("base=10.251.0.0/16,size=24",), mtu=1400, icc=False, tls_san=("web.example",),
    )
    assert config["engine_storage_driver"] == "vfs"
    assert config["engine_opts"] == {"max-concurrent-downloads": 5, "debug": True, "log-level": "warn"}
    assert config["engine_env"] == {"HTTP_PROXY": "http://127.0.0.1:3128"}
    assert config["engine_default_address_pools"] == [{"base": "10.251.0.0/16", "size": 24}]
    assert (config["engine_bip"], config["engine_mtu"], config["engine_icc"]) == ("10.250.7.1/24", 1400, False)
    role_vars = provision.role_vars(config, "CA", "CERT", "KEY")
    assert "tls_san" not in role_vars and role_vars["tls_server_key"] == "KEY"
    assert role_vars["tls_dir"] == "/etc/docker/tls"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"engine": "lxd"}, "--engine"),
    ({"storage_driver": "aufs"}, "aufs"),
    ({"storage_driver": "ext4"}, "--engine-storage-driver"),
    ({"bip": "10.250.7.0/24"}, "network address"),
    ({"bip": "nonsense"}, "--engine-bip"),
    ({"mtu": 20}, "--engine-mtu"),
    ({"opts": ("novalue",)}, "KEY=VALUE"),
    ({"labels": ("=x",)}, "KEY=VALUE"),
    ({"address_pools": ("base=10.0.0.0/16,size=8",)}, "does not fit"),
    ({"address_pools": ("size=24",)}, "base=CIDR"),
])
def test_bad_flags_are_refused_before_anything_runs(kwargs, message):
    with pytest.raises(UsageError, match=message):
        provision.engine_config(**kwargs)
