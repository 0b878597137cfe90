"""What a molecule platform may say to the molecule-pymachine driver, checked before anything is made."""

from __future__ import annotations

import pytest

from machine.errors import UsageError
from machine.molecule_driver.platforms import Platform, check_platforms


def test_a_bare_platform_is_a_local_machine_without_the_engine():
    assert check_platforms([{"name": "instance", "groups": ["web"]}]) == [Platform("instance")]


def test_driver_options_image_and_engine_become_create_arguments(tmp_path):
    image = tmp_path / "debian.qcow2"
    image.touch()
    [platform] = check_platforms([{
        "name": "vm", "driver": "libvirt", "image": str(image), "options": {"libvirt-memory": 2048},
        "engine": True, "engine_options": {"engine-install": "distro", "engine_storage_driver": "overlay2"},
    }])
    assert platform.driver == "libvirt"
    assert platform.options == {"libvirt_image": str(image), "libvirt_memory": "2048"}
    assert platform.engine is not None and platform.engine["engine_install"] == "distro"


@pytest.mark.parametrize(("platform", "message"), [
    ({"name": "bad", "driver": "vagrant"}, "platform bad: unknown driver 'vagrant'"),
    ({"name": "bad", "options": {"local-isolaton": "privileged"}}, "platform bad: --local-isolaton is not an option"),
    ({"name": "bad", "options": {"local-isolation": "chroot"}}, "platform bad: --local-isolation: 'chroot' is not"),
    ({"name": "bad", "options": ["local-isolation"]}, "platform bad: options must be a mapping"),
    ({"name": "bad", "engine": True, "engine_options": {"instal": "distro"}}, "unknown engine option 'instal'"),
    ({"name": "bad", "engine": True, "engine_options": {"engine-storage-driver": "aufs"}}, "platform bad:"),
    ({"name": "bad", "flavour": "large"}, "platform bad: unknown key 'flavour'"),
    ({"name": "bad", "engine_options": {"engine-install": "distro"}},
     "platform bad: engine_options are only used when the engine is installed: add `engine: true`"),
    ({"name": "bad", "engine": False, "engine_options": {"engine-install": "distro"}}, "add `engine: true`"),
    ({"name": "bad", "engine_options": {"instal": "distro"}}, "platform bad: unknown engine option 'instal'"),
    ({"name": "bad", "engine_options": ["engine-install"]}, "platform bad: engine_options must be a mapping"),
    ({"name": "bad", "driver": "generic", "image": "x"}, "platform bad: the generic driver takes no image"),
    ({"name": "../up"}, "platform ../up:"),
    ({}, "platform (unnamed):"),
    # Refused by the driver before a host is asked anything: at the check, not once earlier platforms are made.
    ({"name": "bad", "driver": "libvirt", "options": {"libvirt-cpus": 0}},
     "platform bad: --libvirt-cpus: 0 is less than 1"),
    ({"name": "bad", "driver": "libvirt", "options": {"libvirt-image-sha256": "ab"}},
     "platform bad: --libvirt-image-sha256 applies to an image given by URL or path"),
    # A value of the wrong YAML type is named, not a traceback ("TypeError: int() argument must be ...").
    ({"name": "bad", "driver": "libvirt", "options": {"libvirt-memory": [1024, 2048]}},
     "platform bad: --libvirt-memory takes one value, not a list"),
    ({"name": "bad", "engine": True, "engine_options": {"engine-mtu": "big"}},
     "platform bad: engine_mtu: must be a whole number, not 'big'"),
    ({"name": "bad", "engine": True, "engine_options": {"engine-env": 5}},
     "platform bad: engine_env: must be a string or a list of strings (or a mapping)"),
    ({"name": "bad", "options": {"local-isolation": "userns"}, "engine": True,
      "engine_options": {"engine-storage-driver": "devicemapper"}},
     "platform bad: --engine-storage-driver devicemapper: a machine with --local-isolation userns cannot"),
])
def test_a_platform_pymachine_cannot_make_is_refused(platform: dict, message: str):
    with pytest.raises(UsageError, match=None) as error:
        check_platforms([platform])
    assert message in str(error.value)


def test_two_platforms_of_one_name_are_refused():
    with pytest.raises(UsageError, match="platform 'a' is named twice"):
        check_platforms([{"name": "a"}, {"name": "a"}])


def test_an_empty_engine_option_is_as_if_not_given():
    [platform] = check_platforms([{"name": "a", "engine": True, "engine_options": {"engine-insecure-registry": None}}])
    assert platform.engine is not None and platform.engine["engine_insecure_registries"] == []
