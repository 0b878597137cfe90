"""The engine cache without a machine: which engines it prepares, how layers and base images are found, kept and
pruned."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection
from pathlib import Path

import pytest

from machine import provision as plan
from machine.drivers.local import layers
from machine.drivers.local import rootfs as base_images
from machine.enginecache import PackageSet, Repository, package_set
from machine.errors import UsageError
from machine.store import disk_usage

DOCKER = PackageSet("docker-distro", ("docker.io",))


def test_the_package_set_is_what_the_engine_role_installs():
    assert package_set(plan.engine_config(install="distro")) == DOCKER
    assert package_set(plan.engine_config(engine="podman", install="distro")) == PackageSet(
        "podman-distro", ("podman", "socat"))
    official = package_set(plan.engine_config(install="official"))
    assert official == PackageSet("docker-official", ("docker-ce", "docker-ce-cli", "containerd.io",
                                                      "docker-buildx-plugin"),
                                  Repository("https://download.docker.com/linux", "stable"))
    mirror = package_set(plan.engine_config(install="official", install_url="http://127.0.0.1:8080/linux/"))
    assert mirror.repository == Repository("http://127.0.0.1:8080/linux", "stable")


@pytest.mark.parametrize(("facts", "key_url", "line"), [
    ({"distribution": "Debian", "distribution_release": "bookworm", "architecture": "x86_64"},
     "https://download.docker.com/linux/debian/gpg",
     "deb [arch=amd64 signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/debian bookworm "
     "stable"),
    ({"distribution": "Ubuntu", "distribution_release": "noble", "architecture": "aarch64"},
     "https://download.docker.com/linux/ubuntu/gpg",
     "deb [arch=arm64 signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/ubuntu noble stable"),
])
def test_the_repository_files_are_what_the_role_writes(facts, key_url, line):
    files = package_set(plan.engine_config(install="official")).repository.files(facts)
    assert files.key_url == key_url and files.key_path == "/etc/apt/keyrings/docker.asc"
    assert files.list_path == "/etc/apt/sources.list.d/docker.list"
    assert files.list_text.splitlines()[-1] == line and files.list_text.endswith("\n")


def test_an_install_url_is_only_for_dockers_repository():
    with pytest.raises(UsageError, match="--engine-install-url: only Docker's official repository"):
        plan.engine_config(install="distro", install_url="http://127.0.0.1/linux")
    with pytest.raises(UsageError, match="is not an http"):
        plan.engine_config(install="official", install_url="ftp://mirror/linux")
    assert "engine_official_url" not in plan.engine_config(install="official")  # the role's default serves


def fake_generation(cache: Path, base: Path, packages: PackageSet, name: str, checked: float) -> Path:
    """A published generation as a build leaves it (without the packages), made current."""
    slot = layers._slot(cache, base, packages)
    (slot / name / "rootfs").mkdir(parents=True)
    (slot / name / "users").mkdir()
    (slot / name / "manifest.json").write_text(json.dumps({"packages": {"docker.io": "1"}}))
    (slot / "current.json").write_text(json.dumps({"generation": name, "checked": checked}))
    return slot / name / "rootfs"


def test_a_fresh_current_layer_is_used_as_it_is(tmp_path):
    base = tmp_path / "rootfs/bookworm-abc/rootfs"
    rootfs = fake_generation(tmp_path, base, DOCKER, "g1", time.time())
    assert layers.layer(tmp_path, base, DOCKER) == rootfs  # no build: nothing here could run one
    # Another base, or other packages, is another layer.
    assert layers._slot(tmp_path, tmp_path / "rootfs/trixie-abc/rootfs", DOCKER) != rootfs.parents[1]
    assert layers._slot(tmp_path, base, PackageSet("podman-distro", ("podman", "socat"))) != rootfs.parents[1]


def pruned(cache: Path, **flags: bool) -> list[Path]:
    return [path for path, _ in layers.prune(cache, **flags)]


def test_prune_keeps_what_machines_use_and_rm_only_takes_its_mark(tmp_path):
    base = tmp_path / "rootfs/bookworm-abc/rootfs"
    old = fake_generation(tmp_path, base, DOCKER, "g1", 0)
    new = fake_generation(tmp_path, base, DOCKER, "g2", time.time())
    (new / "dockerd").write_bytes(b"x" * 10000)
    interrupted = new.parents[1] / ".build-0badc0de"
    interrupted.mkdir()
    machines = [tmp_path / "home/machines/a", tmp_path / "home/machines/b"]
    for machine in machines:
        machine.mkdir(parents=True)
        layers.add_user(old, machine)
    layers.add_user(new, machines[0])
    layers.remove_user(new, machines[0])  # as rm does: the layer stays
    assert new.is_dir()

    # Unused and current: kept (the next create uses it) unless everything goes; a dry run removes nothing.
    assert pruned(tmp_path) == [interrupted] and not interrupted.exists()
    assert layers.prune(tmp_path, everything=True, dry_run=True) == [(new.parent, disk_usage(new.parent))]
    assert disk_usage(new.parent) >= 10000 and new.is_dir()
    machines[1].rmdir()  # b is gone without its rm (a killed create): a still uses the old layer
    assert pruned(tmp_path, everything=True) == [new.parent]
    assert old.is_dir() and not (new.parents[1] / "current.json").exists()
    assert not layers.add_user(new, machines[0])  # a create that found it before the prune must look again
    machines[0].rmdir()
    assert pruned(tmp_path) == [old.parent]  # not current: the default prune takes it once nobody uses it
    assert not (tmp_path / layers.DIR / new.parents[1].name).exists()


def fake_base(cache: Path, key: str, recipe: int | None) -> Path:
    """A base as base_rootfs() leaves it (without its files); `recipe` None: built before recipes were kept."""
    root = cache / base_images.DIR / key
    (root / "rootfs/usr").mkdir(parents=True)
    (root / "rootfs/usr/libc").write_bytes(b"x" * 5000)
    if recipe is not None:
        (root / base_images.RECIPE_FILE).write_text(json.dumps({"recipe": recipe}))
    (root / base_images.READY).touch()
    return root / "rootfs"


def pruned_bases(cache: Path, needed: Collection[Path] = (), **flags: bool) -> list[str]:
    return [path.name for path, _ in base_images.prune(cache, needed=needed, **flags)]


def test_a_base_goes_when_no_machine_and_no_layer_needs_it_and_a_newer_recipe_replaced_it(tmp_path):
    current = fake_base(tmp_path, "bookworm-new", base_images.RECIPE)
    old = fake_base(tmp_path, "bookworm-old", base_images.RECIPE - 1)
    older = fake_base(tmp_path, "bookworm-older", base_images.RECIPE - 2)
    unknown = fake_base(tmp_path, "bookworm-unrecorded", None)
    image = fake_base(tmp_path, "image-0123456789abcdef", None)
    elsewhere = fake_base(tmp_path / "other-cache", "bookworm-linked", base_images.RECIPE - 1)
    (tmp_path / base_images.DIR / "bookworm-linked").symlink_to(elsewhere.parent)  # another cache's: never pruned
    interrupted = tmp_path / base_images.DIR / ".bookworm-new.build"
    (interrupted / "rootfs").mkdir(parents=True)
    machine = tmp_path / "home/machines/a"
    machine.mkdir(parents=True)
    assert base_images.add_user(old, machine)
    gone = tmp_path / "home/machines/b"  # a create killed after marking: its directory is gone
    assert base_images.add_user(current, gone)

    # The default prune: what interrupted builds left, and the old recipe's base no machine or layer needs.
    assert base_images.prune(tmp_path, dry_run=True, needed={older}) == [(interrupted, disk_usage(interrupted))]
    assert pruned_bases(tmp_path, needed={older}) == [".bookworm-new.build"] and not interrupted.exists()
    assert pruned_bases(tmp_path) == ["bookworm-older"] and not older.exists()
    # A base of the current recipe, one whose recipe is unknown and a user's image go only with --all.
    assert pruned_bases(tmp_path, everything=True, dry_run=True) == [
        "bookworm-new", "bookworm-unrecorded", "image-0123456789abcdef"]
    assert unknown.is_dir() and image.is_dir()
    base_images.remove_user(old, machine)  # as rm does
    assert pruned_bases(tmp_path, needed={current}) == ["bookworm-old"]
    assert pruned_bases(tmp_path, everything=True) == ["bookworm-new", "bookworm-unrecorded",
                                                      "image-0123456789abcdef"]
    assert [p.name for p in (tmp_path / base_images.DIR).iterdir() if p.is_dir()] == ["bookworm-linked"]
    assert elsewhere.is_dir()
    assert not base_images.add_user(current, machine)  # a create that found it before the prune must look again


def test_disk_usage_counts_a_hard_linked_file_once(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 8192)
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "c").symlink_to("/nonexistent")
    assert 8192 <= disk_usage(tmp_path) < 2 * 8192
    assert disk_usage(tmp_path / "a") == os.stat(tmp_path / "a").st_blocks * 512


def test_the_build_leaves_no_identity_in_the_layer(tmp_path):
    rootfs = tmp_path / "rootfs"
    for rel in ("etc/hostname", "etc/machine-id", "etc/ssh/ssh_host_ed25519_key", "etc/docker/key.json",
                "var/log/apt/term.log", "var/lib/docker/engine-id", "usr/bin/dockerd", "etc/group"):
        (rootfs / rel).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / rel).write_text("x")
    # Links dangle on the host: the build's resolv.conf goes (named without a wildcard), the units' links stay.
    wants = rootfs / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "docker.service").symlink_to("/nonexistent/lib/systemd/system/docker.service")
    (rootfs / "etc/resolv.conf").symlink_to("/nonexistent/run/systemd/resolve/stub-resolv.conf")
    layers._strip(rootfs)
    kept = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*") if p.is_file() or p.is_symlink())
    assert kept == ["etc/group", "etc/systemd/system/multi-user.target.wants/docker.service", "usr/bin/dockerd"]
    assert (rootfs / "var/log/apt").is_dir()  # apt logs into it on the machine


def test_a_layer_with_the_engine_holds_its_start_back_until_provisioning(tmp_path):
    unit, placeholder, _ = layers.HELD_BACK
    without, with_engine = tmp_path / "podman", tmp_path / "docker"
    (with_engine / "usr/lib" / unit).parent.mkdir(parents=True)
    (with_engine / "usr/lib" / unit).write_text("[Service]\n")
    without.mkdir()
    for rootfs in (without, with_engine):
        layers._hold_back(rootfs)
    assert not (without / placeholder).exists()
    # The engine role writes its own drop-in at this path (after daemon.json): the condition holds from then on.
    assert "ConditionPathExists=/etc/docker/daemon.json" in (with_engine / placeholder).read_text()
    tasks = (Path(__file__).parents[2] / "roles/engine/tasks/docker.yml").read_text()
    assert f"dest: /{placeholder}\n" in tasks
