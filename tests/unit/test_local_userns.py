"""The local driver's user namespaces without a machine: the host-wide UID-range lease (real files and locks in a
scratch state directory), the shifted upper layer, and the engine settings a user-namespaced machine refuses."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from machine.drivers.local import LocalDriver, userns
from machine.errors import MachineError, UsageError
from machine.provision import engine_config

FIRST, RANGE = userns.FIRST, userns.RANGE


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    """A state directory of the test's own, no /etc/subuid ranges and no nspawn locks, unless a test adds them."""
    monkeypatch.setattr(userns, "STATE_DIR", tmp_path / "state")
    monkeypatch.setattr(userns, "SUBID_FILES", (tmp_path / "subuid", tmp_path / "subgid"))
    monkeypatch.setattr(userns, "NSPAWN_LOCKS", tmp_path / "nspawn-uid")
    return tmp_path / "state"


def owner(tmp_path: Path, name: str) -> str:
    directory = tmp_path / "machines" / name
    directory.mkdir(parents=True, exist_ok=True)
    return str(directory)


def leases(state: Path) -> dict[str, str]:
    return json.loads((state / "leases.json").read_text())["leases"]


def test_each_owner_gets_a_range_of_its_own_and_keeps_it(state, tmp_path):
    a, b = owner(tmp_path, "a"), owner(tmp_path, "b")
    first_a, first_b = userns.lease(a), userns.lease(b)
    assert first_a == FIRST and first_b == FIRST + RANGE
    assert userns.lease(a) == first_a  # asked again: the same range
    assert userns.lease(a, wanted=first_a) == first_a  # a start keeps it
    assert leases(state) == {str(first_a): a, str(first_b): b}
    assert userns.leased_to(a) == first_a and userns.leased_to(b) == first_b
    with pytest.raises(MachineError, match="is leased to"):
        userns.lease(b, wanted=first_a)


def test_release_is_by_owner_and_the_last_one_removes_the_file(state, tmp_path):
    a, b = owner(tmp_path, "a"), owner(tmp_path, "b")
    userns.lease(a)
    first_b = userns.lease(b)
    userns.release(a)
    userns.release(a)  # twice: nothing to do
    assert leases(state) == {str(first_b): b} and userns.leased_to(a) is None
    assert userns.lease(owner(tmp_path, "c")) == FIRST  # a released range is handed out again
    userns.release(b)
    userns.release(str(tmp_path / "machines/c"))
    assert not (state / "leases.json").exists()


def test_an_owner_whose_directory_is_missing_keeps_its_range(state, tmp_path):
    """A home on a filesystem not mounted now still owns files stored in its range: only rm gives it back."""
    gone = owner(tmp_path, "gone")
    userns.lease(gone)
    os.rmdir(gone)
    assert userns.lease(owner(tmp_path, "new")) == FIRST + RANGE
    userns.release(gone)
    assert userns.lease(owner(tmp_path, "third")) == FIRST


def test_ranges_of_etc_subuid_subgid_and_nspawn_are_skipped(state, tmp_path):
    (tmp_path / "subuid").write_text(f"alice:{FIRST + 10}:65536\n")  # overlaps the first two slots
    (tmp_path / "subgid").write_text(f"bob:{FIRST + 2 * RANGE}:1\n# a comment\nbroken line\n")
    (tmp_path / "nspawn-uid").mkdir()
    (tmp_path / "nspawn-uid" / str(FIRST + 3 * RANGE)).touch()
    assert userns.lease(owner(tmp_path, "a")) == FIRST + 4 * RANGE


def test_no_free_range_is_one_clear_error(state, tmp_path, monkeypatch):
    monkeypatch.setattr(userns, "LAST", FIRST + 2 * RANGE)
    userns.lease(owner(tmp_path, "a"))
    userns.lease(owner(tmp_path, "b"))
    with pytest.raises(MachineError, match="no free range of 65536 UIDs"):
        userns.lease(owner(tmp_path, "c"))


def test_parallel_leases_never_share_a_range(state, tmp_path):
    owners = [owner(tmp_path, f"m{i}") for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        firsts = list(pool.map(userns.lease, owners))
    assert len(set(firsts)) == 16 and all(f % RANGE == 0 and FIRST <= f < userns.LAST for f in firsts)
    assert leases(state) == {str(f): o for f, o in zip(firsts, owners, strict=True)}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_shift_tree_moves_ids_into_the_range_and_keeps_modes(tmp_path):
    top = tmp_path / "upper"
    (top / "etc/ssh").mkdir(parents=True)
    (top / "etc/ssh/key").write_text("k")
    (top / "etc/ssh/key").chmod(0o600)
    (top / "bin").mkdir()
    (top / "bin/tool").write_text("#!/bin/sh\n")
    os.chown(top / "bin/tool", 0, 42)
    (top / "bin/tool").chmod(0o4755)
    (top / "link").symlink_to("etc")
    shift = FIRST + 5 * RANGE
    userns.shift_tree(top, shift)
    userns.shift_tree(top, shift)  # a second pass changes nothing
    for path in (top, top / "etc", top / "etc/ssh", top / "etc/ssh/key", top / "link"):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid) == (shift, shift), path
    tool = os.lstat(top / "bin/tool")
    assert (tool.st_uid, tool.st_gid, tool.st_mode & 0o7777) == (shift, shift + 42, 0o4755)
    assert os.lstat(top / "etc/ssh/key").st_mode & 0o7777 == 0o600


def options(isolation: str) -> dict:
    return {"local_isolation": isolation}


@pytest.mark.parametrize(("flags", "fragment"), [
    ({"storage_driver": "btrfs"}, "--engine-storage-driver btrfs: a machine with --local-isolation userns cannot "
                                  "mount loop devices; add --local-isolation privileged"),
    ({"storage_driver": "zfs"}, "--engine-storage-driver zfs:"),
    ({"storage_driver": "btrfs", "storage_device": "/dev/vdb"}, "--engine-storage-device: a machine with "
                                                                "--local-isolation userns cannot use block devices"),
])
def test_userns_refuses_engine_storage_that_needs_devices(flags, fragment):
    engine = engine_config(install="distro", **flags)
    with pytest.raises(UsageError) as refused:
        LocalDriver.check_engine(options("userns"), engine)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)
    assert "--local-isolation privileged" in str(refused.value)
    LocalDriver.check_engine(options("privileged"), engine)  # today's mode hosts them


@pytest.mark.parametrize("storage", ["overlay2", "vfs", "fuse-overlayfs"])
def test_userns_hosts_the_other_storage_drivers(storage):
    LocalDriver.check_engine(options("userns"), engine_config(storage_driver=storage))
    LocalDriver.check_engine(options("userns"), {})  # a create without engine settings


def test_isolation_is_an_option_with_userns_by_default():
    [option] = [o for o in LocalDriver.options if o.name == "local-isolation"]
    assert option.default == "userns" and option.choices == ("userns", "privileged")
    assert option.parse("privileged") == "privileged"
    with pytest.raises(UsageError, match="is not one of userns, privileged"):
        option.parse("root")
