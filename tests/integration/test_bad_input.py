"""Bad input that needs root: a read-only store, a store or cache that is not a directory, a disk that fills
up while an image downloads, and bad input about a machine that exists (one, shared by the module, made
without an engine). Each ends with one line on stderr, exit 1, no traceback, the store unchanged and nothing
half-written in the cache. Only the shared machine boots; every other case fails before a machine could.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine.store import Store
from tests.conftest import CLI
from tests.integration.conftest import bridge_leftovers, machine_cli, serve_directory
from tests.unit.test_bad_input import ROLES, assert_refused, snapshot

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def mounted(*mount_args: str, target: Path) -> Iterator[Path]:
    """`mount ARGS TARGET` on the host for the duration of a test, unmounted even when the test fails."""
    subprocess.run(["mount", *mount_args, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A store holding one machine's record (web1), so that 'unchanged' has something to compare."""
    with Store(tmp_path / "home").reserve("web1", "local", {}):
        pass
    return tmp_path / "home"


@pytest.fixture
def cli(home: Path, tmp_path: Path) -> Iterator[CLI]:
    # HOME: a docker context made or removed by mistake would land here, not in root's own.
    yield from machine_cli(home, HOME=str(tmp_path))


def test_a_read_only_store_is_refused_in_one_line(cli: CLI, home: Path):
    before = snapshot(home)
    with mounted("--bind", "-o", "ro", str(home), target=home):
        assert_refused(cli("create", "--no-provision", "web2", check=False), 1, "Read-only file system")
        assert_refused(cli("rm", "-y", "web1", check=False), 1, "Read-only file system")
        assert_refused(cli("stop", "web1", check=False), 1, "Read-only file system")
        assert cli("ls", "-q").stdout.split() == ["web1"]  # reading still works
    assert snapshot(home) == before


def test_a_store_or_cache_that_is_a_file_is_refused_in_one_line(cli: CLI, tmp_path: Path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("not a directory\n")
    image = tmp_path / "rootfs.tar"
    image.write_bytes(b"\0" * 10240)
    as_home = cli.run(["env", f"PYMACHINE_HOME={not_a_dir}"], "create", "--no-provision", "web2")
    assert_refused(as_home, 1, f"{not_a_dir}/machines: Not a directory")
    before = snapshot(cli.home)
    as_cache = cli.run(["env", f"PYMACHINE_CACHE={not_a_dir}"], "create", "--no-provision", "--local-image",
                       str(image), "web2")
    assert_refused(as_cache, 1, "Not a directory")
    assert snapshot(cli.home) == before
    assert not_a_dir.read_text() == "not a directory\n"


def test_a_full_disk_during_an_image_download_leaves_no_partial_file(cli: CLI, tmp_path: Path):
    """The image cache on a 1 MiB tmpfs, the image 4 MiB: the write fails with ENOSPC mid-download."""
    served, cache = tmp_path / "served", tmp_path / "cache"
    served.mkdir()
    cache.mkdir()
    (served / "big.tar").write_bytes(b"\0" * (4 << 20))
    before = snapshot(cli.home)
    with mounted("-t", "tmpfs", "-o", "size=1m", "tmpfs", target=cache), serve_directory(served) as (url, requested):
        proc = cli.run(["env", f"PYMACHINE_CACHE={cache}"], "create", "--no-provision", "--local-image",
                       f"{url}/big.tar", "web2")
        assert_refused(proc, 1, f"cannot store {url}/big.tar in the image cache {cache}/local/images: "
                                f"No space left on device")
        assert requested == ["/big.tar"]  # the download did start: the disk filled up during it
        left = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
        assert left == ["local/images/.lock"]
    assert snapshot(cli.home) == before
    assert not bridge_leftovers()


def records(home: Path) -> dict[str, bytes | None]:
    """The store without its TLS material: provisioning issues the CA and the machine's certificates (and keeps
    their names and ends beside them) before the roles run, so a run that fails on the machine still leaves them
    (the engine needs them anyway)."""
    return {path: data for path, data in snapshot(home).items()
            if not (path.startswith("certs") or path.endswith((".pem", ".pem.names", ".pem.expires")))}


# -- bad input about a machine that exists: one machine, made without an engine, shared by these tests ----------
@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CLI]:
    scratch = tmp_path_factory.mktemp("machine")
    for cli in machine_cli(scratch / "home", HOME=str(scratch)):
        cli("create", "--no-provision", "bad1")
        yield cli


def test_scp_of_a_missing_path_on_the_machine(machine: CLI, tmp_path: Path):
    before = snapshot(machine.home)
    assert_refused(machine("scp", "bad1:/nonexistent", str(tmp_path / "x"), check=False), 1,
                   "bad1:/nonexistent: no such file or directory")
    assert_refused(machine("scp", "/etc/hostname", "bad1:/nonexistent/dir/x", check=False), 1,
                   "bad1:/nonexistent/dir/x: no such file or directory")
    assert_refused(machine("scp", str(tmp_path), "bad1:/tmp", check=False), 1, "-r")
    assert list(tmp_path.iterdir()) == []
    assert machine("ssh", "bad1", "--", "test", "-e", f"/tmp/{tmp_path.name}", check=False).returncode == 1
    assert snapshot(machine.home) == before


def test_engine_commands_on_a_machine_without_an_engine(machine: CLI):
    before = snapshot(machine.home)
    for command in ("env", "config"):
        assert_refused(machine(command, "bad1", check=False), 1, "has no engine certificates yet")
    assert snapshot(machine.home) == before


def test_a_role_that_fails_on_the_machine_is_one_line(machine: CLI, tmp_path: Path):
    """A template that names an undefined variable compiles, so only running it finds the mistake: one line
    naming the task, and the file the task would have written is not on the machine."""
    roles = tmp_path / "roles"
    shutil.copytree(ROLES, roles)
    template = roles / "kernel/templates/modules-load.conf.j2"
    template.write_text(template.read_text() + "{{ no_such_variable }}\n")
    before = records(machine.home)
    proc = machine.run(["env", f"PYMACHINE_ROLES_PATH={roles}"], "provision", "--tags", "kernel", "bad1")
    assert_refused(proc, 1, "provisioning bad1 failed: ")
    assert "no_such_variable" in proc.stderr
    assert machine("ssh", "bad1", "--", "test", "-e", "/etc/modules-load.d/pymachine.conf", check=False).returncode == 1
    assert records(machine.home) == before
