import json
import multiprocessing
import stat

import pytest

from machine.errors import MachineError, UsageError
from machine.store import Store, file_lock, write_atomic


def test_reserve_writes_config_and_refuses_a_taken_name(tmp_path):
    store = Store(tmp_path)
    machine = store.reserve("web1", "local", {"local_release": "bookworm"})
    record = json.loads((tmp_path / "machines/web1/config.json").read_text())
    assert record["name"] == "web1" and record["driver"] == "local" and record["state"] == "creating"
    assert stat.S_IMODE(machine.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(machine.config_path.stat().st_mode) == 0o600
    with pytest.raises(UsageError, match="already exists"):
        store.reserve("web1", "local", {})
    assert store.names() == ["web1"]  # no staging directory left behind


def test_record_persists_resources(tmp_path):
    store = Store(tmp_path)
    machine = store.reserve("m", "local", {})
    machine.record(ip="10.0.0.2")
    assert store.load("m").resources == {"ip": "10.0.0.2"}


def test_load_errors_are_one_line(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(MachineError, match="no machine named 'nope'"):
        store.load("nope")
    (tmp_path / "machines/broken").mkdir(parents=True)
    (tmp_path / "machines/broken/config.json").write_text("{")
    with pytest.raises(MachineError, match="corrupt"):
        store.load("broken")


def test_write_atomic_sets_mode_and_replaces(tmp_path):
    path = tmp_path / "key"
    write_atomic(path, b"one", 0o600)
    write_atomic(path, b"two", 0o600)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def _hold(path, ready, release):
    with file_lock(path, 5, "it"):
        ready.set()
        release.wait(5)


def test_lock_times_out_with_a_clear_error(tmp_path):
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(tmp_path / "lock", ready, release))
    holder.start()
    try:
        assert ready.wait(5)
        with pytest.raises(MachineError, match="busy"), file_lock(tmp_path / "lock", 0.2, "machine 'm'"):
            pass
    finally:
        release.set()
        holder.join()
    with file_lock(tmp_path / "lock", 0.2, "machine 'm'"):
        pass


def test_cache_dir_can_be_shared_between_homes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYMACHINE_CACHE", str(tmp_path / "shared"))
    assert Store(tmp_path / "a").cache("local") == Store(tmp_path / "b").cache("local") == tmp_path / "shared/local"
