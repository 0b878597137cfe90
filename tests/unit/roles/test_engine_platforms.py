"""The engine role's choices for each distribution family we support (only Debian can run here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from machine.roles.facts import as_variables, parse_facts
from machine.roles.templating import Templar, Vars
from tests.unit.roles.test_facts import CENTOS_STREAM_9, DEBIAN_12, FEDORA_40, RHEL_9, UBUNTU_2404, output

ROLE = Path(__file__).parents[3] / "roles" / "engine"


def engine_vars(os_release: str, **facts_extra: str) -> Vars:
    facts = as_variables(parse_facts(output(os_release, **facts_extra)))
    defaults = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    role_vars = yaml.safe_load((ROLE / "vars/main.yml").read_text())
    return Vars(Templar(), [(defaults, False), (facts, True), (role_vars, False)])


@pytest.mark.parametrize(("os_release", "extra", "platform", "repo_dir", "official", "distro"), [
    (DEBIAN_12, {}, "Debian", "debian", "docker-ce", ["docker.io"]),
    (UBUNTU_2404, {}, "Debian", "ubuntu", "docker-ce", ["docker.io"]),
    (FEDORA_40, {"pkg": "dnf"}, "Fedora", "fedora", "docker-ce", ["moby-engine"]),
    (CENTOS_STREAM_9, {"pkg": "dnf"}, "RedHat", "centos", "docker-ce", None),
    (RHEL_9, {"pkg": "dnf"}, "RedHat", "rhel", "docker-ce", None),
], ids=["debian12", "ubuntu2404", "fedora40", "centos-stream9", "rhel9"])
def test_engine_packages_and_repository_per_family(os_release, extra, platform, repo_dir, official, distro):
    variables = engine_vars(os_release, **extra)
    templar = Templar()
    assert variables["engine_platform"] == platform
    assert templar.template("{{ engine_official_dirs[ansible_distribution] }}", variables) == repo_dir
    assert official in templar.template("{{ engine_packages.docker.official[engine_platform] }}", variables)
    # RHEL and its rebuilds ship no Docker Engine package: the role refuses distro there, naming it.
    assert templar.template("{{ engine_packages.docker.distro.get(engine_platform) }}", variables) == distro
    assert "podman" in templar.template("{{ engine_packages.podman.distro[engine_platform] }}", variables)
