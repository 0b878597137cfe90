"""The cloud-init seed: rendered files and the ISO cloud-init's NoCloud source reads."""

from __future__ import annotations

import io

import pytest
import yaml

from machine import cloudinit, sshkeys
from machine.drivers.libvirt import seed

pycdlib = pytest.importorskip("pycdlib")

MAC = "52:54:00:ab:cd:ef"


@pytest.fixture
def files() -> dict[str, str]:
    host = sshkeys.new_keypair("root@web")
    return seed.render("web", "pymachine-0123abcd", "ssh-ed25519 AAAAuser pymachine@web", host, MAC) | {
        "host_public": host.public_line, "host_private": host.private_openssh.decode()}


def test_user_data_gives_root_our_key_and_the_pinned_host_key(files):
    assert files["user-data"].startswith("#cloud-config\n")
    data = yaml.safe_load(files["user-data"])
    assert data["hostname"] == "web"
    assert data["disable_root"] is False
    assert data["ssh_authorized_keys"] == ["ssh-ed25519 AAAAuser pymachine@web"]
    assert data["ssh_keys"] == {"ed25519_private": files["host_private"], "ed25519_public": files["host_public"]}
    assert data["ssh_genkeytypes"] == ["ed25519"] and data["ssh_deletekeys"] is True


def test_user_data_is_the_shared_cloud_init_user_data_for_root():
    host = sshkeys.new_keypair("root@web")
    rendered = seed.render("web", "pymachine-0123abcd", "ssh-ed25519 AAAAuser pymachine@web", host, MAC)
    assert rendered["user-data"] == cloudinit.user_data("web", "root", "ssh-ed25519 AAAAuser pymachine@web", host)


def test_meta_data_and_network_config(files):
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "pymachine-0123abcd", "local-hostname": "web"}
    net = yaml.safe_load(files["network-config"])
    assert net["version"] == 2
    assert net["ethernets"]["primary"] == {"match": {"macaddress": MAC}, "dhcp4": True}


def test_values_cannot_break_out_of_the_yaml():
    host = sshkeys.new_keypair()
    rendered = seed.render('evil"\nruncmd: [reboot]', "id: x", "key\nruncmd: [halt]", host, MAC)
    data = yaml.safe_load(rendered["user-data"])
    assert "runcmd" not in data and data["hostname"] == 'evil"\nruncmd: [reboot]'


def test_iso_is_labelled_cidata_with_the_exact_file_names(files):
    wanted = {name: files[name] for name in seed.FILES}
    raw = seed.iso(wanted)
    image = pycdlib.PyCdlib()
    image.open_fp(io.BytesIO(raw))
    try:
        assert image.pvd.volume_identifier.decode().strip() == "cidata"
        for name, text in wanted.items():
            for kind in ("rr_path", "joliet_path"):
                out = io.BytesIO()
                image.get_file_from_iso_fp(out, **{kind: f"/{name}"})
                assert out.getvalue().decode() == text
    finally:
        image.close()
