"""Registries of a store: which ones every machine trusts, and the flags that add one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from machine import certs, drivers, provision, shellenv
from machine.commands.engine import _registry_vars, trusted_registries
from machine.errors import MachineError
from machine.store import Store


def _machine(store: Store, name: str, registry: bool, sans: list[str] | None = None) -> None:
    """A recorded machine; with `sans`, its registry certificate issued from the store's CA for those names."""
    with store.reserve(name, "local", {}, provision.engine_config(registry=registry)) as machine:
        if sans is not None:
            ca, _ = certs.ensure_ca(store.certs())
            certs.issue_server(ca, certs.registry_pair(machine.dir), name, sans)


def test_every_name_of_every_registry_is_trusted_but_loopback(tmp_path):
    store = Store(tmp_path / "home")
    _machine(store, "plain", registry=False)
    _machine(store, "hub", registry=True, sans=["10.231.0.5", "fd00::5"])
    _machine(store, "pending", registry=True)  # recorded, never provisioned: no certificate, nothing to trust yet
    (store.machines_dir / "broken").mkdir()  # a damaged record is skipped, not fatal
    assert trusted_registries(store) == ["10.231.0.5:5000", "[fd00::5]:5000", "hub:5000"]


@pytest.mark.parametrize(("address", "refused"), [("127.0.0.1", True), ("10.231.0.9", False), ("hub.example", False)])
def test_a_registry_behind_forwarded_loopback_ports_is_refused(tmp_path, address, refused):
    """A machine reached at 127.0.0.1 (libvirt's user networking) cannot serve the others."""
    store = Store(tmp_path / "home")
    _machine(store, "hub", registry=True, sans=[address])
    machine = store.load("hub")
    machine.options = {"generic_ip_address": address, "generic_ssh_port": 22}
    driver = drivers.get("generic")(machine, store)
    if refused:
        with pytest.raises(MachineError, match="ports forwarded on"):
            _registry_vars(store, machine, driver, certs.registry_pair(machine.dir).pem())
    else:
        variables = _registry_vars(store, machine, driver, certs.registry_pair(machine.dir).pem())
        assert "-----BEGIN CERTIFICATE-----" in variables["registry_tls_cert"]
        assert set(variables) <= provision.own_vars()  # a fleet's vars cannot override them


def test_create_records_the_registry_and_defaults_to_none():
    assert provision.engine_config()["registry_enabled"] is False
    assert provision.engine_config(registry=True)["registry_enabled"] is True
    assert "registry" in provision.ROLES


def test_a_registry_needs_the_engine(tmp_path):
    home = tmp_path / "home"
    for flag in ("--no-provision", "--no-connect"):
        proc = subprocess.run([sys.executable, "-m", "machine", "create", "--registry", flag, "web1"],
                              env={"PYMACHINE_HOME": str(home), "PATH": "/usr/bin:/bin"}, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [
            "pymachine: error: --registry runs on the machine's engine: it cannot go with --no-provision or "
            "--no-connect"]
    assert not (home / "machines").exists() or not any((home / "machines").iterdir())


@pytest.mark.parametrize("names", [(), ("REQUESTS_CA_BUNDLE",), ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")])
def test_ca_bundle_variables_that_break_compose_are_found(monkeypatch, names):
    for name in shellenv.CA_BUNDLE_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in names:
        monkeypatch.setenv(name, "/etc/ssl/certs/ca-certificates.crt")
    assert shellenv.ca_bundle_overrides() == list(names)


def test_the_registry_role_loads_and_its_tag_selects_it():
    provision.check_roles(("registry",))  # `provision --tags registry` re-runs only the registry's tasks
