"""The engine cache: local machines whose engine packages come pre-installed from a shared read-only layer.

The module has an image cache of its own (the suite's base image linked in), so the first create really builds the
layer, and a rebuild here disturbs no other test. Machines: `a` (userns) and `b` (privileged) from the first
layer, created at once; `c` from the layer that a changed archive makes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine import commands
from machine import provision as plan
from machine.store import CACHE_ENV, Store
from tests.conftest import CLI
from tests.integration import docker_repo
from tests.integration.conftest import (
    BRIDGE,
    CACHE,
    SUBNET,
    busybox_image,
    docker,
    leftovers,
    machine_cli,
    machine_record,
)
from tests.integration.test_role_engine import Recorder

pytestmark = pytest.mark.integration

PACKAGE_TASK = "engine : Install Docker Engine packages (apt)"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Iterator[Path]:
    """An image cache with the suite's base images linked in and no engine layer yet."""
    own = tmp_path_factory.mktemp("cache")
    (own / "local/rootfs").mkdir(parents=True)
    shared = Path(CACHE) / "local/rootfs"
    for base in shared.iterdir() if shared.is_dir() else []:
        if (base / "complete").exists():
            (own / "local/rootfs" / base.name).symlink_to(base)
    yield own
    shutil.rmtree(own)  # after the machines (cli's finalizer runs first): the layers are hundreds of MiB


@pytest.fixture(scope="module")
def cli(tmp_path_factory, cache) -> Iterator[CLI]:
    tmp = tmp_path_factory.mktemp("engine-cache")
    yield from machine_cli(tmp / "home", PYMACHINE_CACHE=str(cache), DOCKER_CONFIG=str(tmp / "docker-config"),
                           DOCKER_BUILDKIT="0")


def create_reporting(cli: CLI, name: str, isolation: str, **engine: str) -> Recorder:
    """`create --engine-install distro` (or `engine`'s settings) of `name` in this process, keeping what each
    provisioning task reported."""
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, cli.env["PYMACHINE_CACHE"])
        store = Store(cli.home)
    options = {"local_bridge": BRIDGE, "local_subnet": SUBNET, "local_isolation": isolation}
    commands.create(store, name, "local", options, engine=plan.engine_config(**{"install": "distro", **engine}),
                    reporter=recorder)
    return recorder


@pytest.fixture(scope="module")
def first(cli) -> Recorder:
    """`a` (here, reporting its tasks) and `b` (the CLI) created at once while no layer exists: one builds it,
    the other waits for it (its lock). What a's provisioning reported."""
    other = cli.popen("create", "--engine-install", "distro", "--local-isolation", "privileged", "b")
    try:
        report = create_reporting(cli, "a", "userns")
    finally:
        _, stderr = other.communicate(timeout=1800)
    assert other.returncode == 0, stderr
    return report


@pytest.fixture(scope="module")
def rebuilt(cli, first) -> tuple[Path, Path, Recorder]:
    """The archive moved on (simulated), `upgrade a` asked it, then `c` was created: (the layer of a and b, the
    layer of c, what c's provisioning reported)."""
    old = layer_of(cli, "a")
    archive_moves_on(cli, old)
    report = create_reporting(cli, "c", "userns")
    return old, layer_of(cli, "c"), report


def archive_moves_on(cli: CLI, layer: Path) -> Path:
    """As if the archive had moved on since `layer` (the current one) was built: its recorded version is no
    longer the candidate. `upgrade a` asks the archive now, whatever the age of the last answer, and builds the
    next generation; returns it."""
    manifest = layer.parent / "manifest.json"
    recorded = json.loads(manifest.read_text())
    recorded["packages"]["docker.io"] = "0.0~pmold"
    manifest.write_text(json.dumps(recorded))
    cli("upgrade", "a", timeout=1800)
    slot = layer.parents[1]
    return slot / json.loads((slot / "current.json").read_text())["generation"] / "rootfs"


def layer_of(cli: CLI, name: str) -> Path:
    return Path(machine_record(cli, name)["resources"]["engine_layer"])


def ssh(cli: CLI, name: str, command: str) -> str:
    return cli("ssh", name, "--", command).stdout.strip()


def test_both_machines_share_one_layer_built_once(cli, cache, first):
    assert layer_of(cli, "a") == layer_of(cli, "b")
    generations = [p for p in layer_of(cli, "a").parents[1].iterdir() if p.is_dir()]
    assert generations == [layer_of(cli, "a").parent]  # the one that waited did not build a second
    assert (layer_of(cli, "a") / "usr/sbin/dockerd").is_file()
    # The packages are in the layer, not copied into each machine: its own layer holds kilobytes to a few MiB.
    upper = cli.home / "machines/a/layer/upper"
    used = int(subprocess.run(["du", "-sb", str(upper)], capture_output=True, text=True).stdout.split()[0])
    assert used < 20 * 2**20, used


@pytest.mark.parametrize("name", ["a", "b"])
def test_a_machine_from_the_layer_runs_a_container_over_tls(cli, first, name, tmp_path):
    docker(cli, name, "build", "-q", "-t", "pm-busybox", str(busybox_image(tmp_path)))
    assert docker(cli, name, "run", "--rm", "pm-busybox", "echo", f"hello from {name}").strip() == f"hello from {name}"


def test_provisioning_finds_the_packages_and_still_configures_the_machine(first):
    statuses = dict(first.statuses)
    assert statuses[PACKAGE_TASK] == "ok", first.stream.getvalue()
    # What is the machine's own still happens: its certificates, its daemon.json.
    assert statuses["tls : TLS certificates"] == "changed"
    assert statuses["engine : daemon.json"] == "changed"


def test_the_engine_starts_once_with_its_configuration(cli, first):
    # The layer does not start the engine at boot (it would start with the package's settings, only to be
    # restarted by provisioning): the role starts it once, configured. It is enabled already (no `systemctl
    # enable`, which reloads systemd), and starts at every later boot.
    statuses = dict(first.statuses)
    assert statuses["engine : Docker enabled and started"] == "ok", first.stream.getvalue()
    starts = ssh(cli, "a", "journalctl -b -u docker.service -o cat | grep -c '^Starting docker.service'")
    assert starts == "1", ssh(cli, "a", "journalctl -b -u docker.service -o cat")
    assert ssh(cli, "a", "systemctl is-enabled docker.service") == "enabled"
    assert "ConditionPathExists" not in ssh(cli, "a", "systemctl cat docker.service")  # the role's drop-in now
    # The layer's /usr is newer than the base's: it is marked up to date too (no update units at boot).
    assert ssh(cli, "a", "systemctl show -P ConditionResult systemd-sysusers") == "no"


def test_machines_from_one_layer_have_identities_of_their_own(cli, first):
    def identity(name: str) -> tuple[str, ...]:
        return (ssh(cli, name, "cat /etc/machine-id"), ssh(cli, name, "cat /etc/ssh/ssh_host_ed25519_key.pub"),
                ssh(cli, name, f"openssl x509 -noout -serial -in {plan.TLS_DIR}/server-cert.pem"),
                docker(cli, name, "info", "--format", "{{.ID}}").strip(), ssh(cli, name, "hostname"))

    a, b = identity("a"), identity("b")
    assert all(x and y and x != y for x, y in zip(a, b, strict=True)), (a, b)
    # None of it comes from the layer: the build made no key, id, certificate or engine state.
    layer = layer_of(cli, "a")
    made = [rel for rel in ("etc/machine-id", "etc/hostname", "etc/docker/daemon.json", "etc/docker/key.json",
                            "etc/docker/tls", "var/lib/docker") if (layer / rel).exists()]
    assert made == [] and list(layer.glob("etc/ssh/ssh_host_*")) == []


def test_a_changed_candidate_version_rebuilds_the_layer_for_new_machines(cli, rebuilt):
    old, new, report = rebuilt
    assert new != old and json.loads((new.parent / "manifest.json").read_text())["packages"]["docker.io"] != "0.0~pmold"
    assert dict(report.statuses)[PACKAGE_TASK] == "ok", report.stream.getvalue()
    assert old.is_dir() and layer_of(cli, "a") == old  # a and b keep the generation they were made with
    assert ssh(cli, "a", "systemctl is-active docker") == "active"


def test_rm_keeps_the_layer_and_leaves_nothing_and_prune_removes_unused_layers(cli, rebuilt):
    old, new, _ = rebuilt
    record, machine_dir = machine_record(cli, "c"), cli.home / "machines/c"
    cli("rm", "-y", "c")
    assert leftovers(record, machine_dir) == []
    assert (new / "usr/sbin/dockerd").is_file()

    # The archive moves on again: the next generation removes the one it supersedes, which nobody uses now; the
    # old one serves a and b, and stays.
    newest = archive_moves_on(cli, new)
    assert newest != new and not new.parent.exists() and old.is_dir() and layer_of(cli, "a") == old

    # The newest serves nobody, but the next create would use it: only --all removes it (a dry run says so first).
    assert cli("cache", "prune").stdout == "nothing to remove (--all: also what the next create would use)\n"
    name = f"engine layer {newest.parents[1].name}/{newest.parent.name}"
    dry_run = cli("cache", "prune", "--all", "--dry-run").stdout.splitlines()
    assert len(dry_run) == 2 and dry_run[0].startswith(f"would remove {name} (") and dry_run[1].startswith(
        "would free "), dry_run
    assert newest.is_dir()
    removed, freed = cli("cache", "prune", "--all").stdout.splitlines()
    assert removed.startswith(f"removed {name} (") and removed.endswith(" MiB)") and freed.startswith("freed ")
    assert float(removed.split("(")[1].split()[0]) > 100  # the packages: hundreds of MiB
    assert old.is_dir() and not newest.parent.exists()
    assert not (newest.parents[1] / "current.json").exists()  # the next create builds again


def test_dockers_official_packages_come_from_the_cache_too(cli, docker_repository):
    url, asked = docker_repository
    report = create_reporting(cli, "o", "userns", install="official", install_url=f"{url}/linux")
    # The build added the repository as the role does and installed from it; the machine, which could not reach
    # 127.0.0.1 of this host, found the role's key, list and packages in place and asked nothing.
    assert {"/linux/debian/gpg", "/linux/debian/dists/bookworm/InRelease"} <= set(asked)
    assert any(path.startswith("/linux/debian/pool/stable/docker-ce_") for path in asked)
    statuses = dict(report.statuses)
    for task in ("engine : Docker's repository key", "engine : Docker's apt repository", PACKAGE_TASK):
        assert statuses[task] == "ok", (task, report.stream.getvalue())
    assert statuses["engine : Refresh the package lists"] == "skipped"
    assert "-docker-official-" in str(layer_of(cli, "o"))
    assert ssh(cli, "o", "dpkg-query -W -f '${Version}' docker-ce") == docker_repo.VERSION
    assert f"{url}/linux/debian bookworm stable" in ssh(cli, "o", "cat /etc/apt/sources.list.d/docker.list")
    assert docker(cli, "o", "version", "--format", "{{.Server.Os}}").strip() == "linux"
