import json
import multiprocessing
import stat
import threading
import time

import pytest

from machine.errors import MachineError, UsageError
from machine.store import Machine, RecordDamaged, Store, file_lock, write_atomic


def reserve(store: Store, name: str, driver: str = "local", options: dict | None = None) -> Machine:
    with store.reserve(name, driver, options or {}) as machine:
        return machine


def test_reserve_writes_config_and_refuses_a_taken_name(tmp_path):
    store = Store(tmp_path)
    machine = reserve(store, "web1", options={"local_release": "bookworm"})
    record = json.loads((tmp_path / "machines/web1/config.json").read_text())
    assert record["name"] == "web1" and record["driver"] == "local" and record["state"] == "creating"
    assert stat.S_IMODE(machine.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(machine.config_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(machine.journal_path.stat().st_mode) == 0o600
    with pytest.raises(UsageError, match="already exists"):
        reserve(store, "web1")
    assert store.names() == ["web1"]
    assert [p.name for p in store.machines_dir.iterdir()] == ["web1"]  # no staging directory left behind


def test_a_reserved_machine_is_locked_until_its_create_lets_go(tmp_path):
    store = Store(tmp_path)
    with store.reserve("web1", "local", {}), pytest.raises(MachineError, match="busy"), \
            store.locked("web1", timeout=0.2):
        pass
    with store.locked("web1", timeout=0.2) as machine:
        assert machine.name == "web1"


def test_busy_tells_whether_a_command_holds_the_machine_and_never_waits(tmp_path):
    store = Store(tmp_path)
    with store.reserve("web1", "local", {}):
        assert store.busy("web1")
        with pytest.raises(MachineError, match="busy"), store.locked("web1", timeout=0.2):
            pass  # the look took no lock of its own
    assert not store.busy("web1") and not store.busy("nothing") and not store.busy("..")
    with store.locked("web1", timeout=0.2):
        assert store.busy("web1")


def test_record_persists_resources_in_config_and_journal(tmp_path):
    store = Store(tmp_path)
    machine = reserve(store, "m", options={"local_bridge": "pmbr0"})
    machine.record(ip="10.0.0.2")
    machine.record(pid=7)
    assert store.load("m").resources == {"ip": "10.0.0.2", "pid": 7}
    machine.config_path.unlink()
    recovered = store.recover("m")
    assert (recovered.id, recovered.driver, recovered.options) == (machine.id, "local", {"local_bridge": "pmbr0"})
    assert recovered.resources == {"ip": "10.0.0.2", "pid": 7}


def test_a_record_is_written_only_when_it_changed(tmp_path):
    # A fleet's no-op run saves every machine's record: unchanged, it is not written (nor fsynced) again.
    store = Store(tmp_path)
    reserve(store, "m")
    machine = store.load("m")
    before = machine.config_path.stat().st_ino
    machine.save()
    assert machine.config_path.stat().st_ino == before
    machine.state = "ready"
    machine.save()
    assert machine.config_path.stat().st_ino != before
    assert store.load("m").state == "ready"


def test_a_torn_journal_line_is_skipped(tmp_path):
    store = Store(tmp_path)
    machine = reserve(store, "m")
    machine.record(ip="10.0.0.2")
    with machine.journal_path.open("a") as f:
        f.write('{"resources": {"pid": 1')  # a crash in the middle of an append
    assert store.recover("m").resources == {"ip": "10.0.0.2"}
    machine.record(cgroup="pm-1")  # the next command's entry is not lost with the torn line
    assert store.recover("m").resources == {"ip": "10.0.0.2", "cgroup": "pm-1"}


def test_a_relative_home_is_recorded_absolute(tmp_path, monkeypatch):
    # Leases and cache marks name a machine by its directory, and other commands run from other directories.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYMACHINE_HOME", "pm")
    monkeypatch.delenv("PYMACHINE_CACHE", raising=False)
    store = Store()
    assert store.home == tmp_path / "pm" and store.cache_dir == tmp_path / "pm/cache"
    assert reserve(store, "m").dir == tmp_path / "pm/machines/m"


@pytest.mark.parametrize(("content", "text"), [
    ("", "corrupt"), ('{"name": "m", "dri', "corrupt"), ("[]", "not an object"), ('{"name": "m"}', "no 'driver'"),
    ('{"name": "m", "driver": "local", "id": 5}', "'id' is not a str"),
    ('{"name": "m", "driver": "local", "id": "x", "resources": []}', "'resources' is not a dict"),
    (None, "no config.json"),
])
def test_damaged_records_are_one_line_errors_and_the_journal_still_knows(tmp_path, content, text):
    store = Store(tmp_path)
    machine = reserve(store, "m")
    machine.record(ip="10.0.0.2")
    if content is None:
        machine.config_path.unlink()
    else:
        machine.config_path.write_text(content)
    with pytest.raises(RecordDamaged, match=text):
        store.load("m")
    with pytest.raises(RecordDamaged), store.locked("m"):
        pass
    with store.locked("m", recover=True) as recovered:
        assert recovered.id == machine.id and recovered.resources == {"ip": "10.0.0.2"}


def test_a_machine_without_record_or_journal_is_named_not_guessed(tmp_path):
    store = Store(tmp_path)
    (store.machines_dir / "bare").mkdir(parents=True)
    with pytest.raises(MachineError, match=r"neither a readable config\.json nor a journal"):
        store.recover("bare")


def test_load_errors_are_one_line(tmp_path):
    store = Store(tmp_path)
    for name in ("nope", "..", "../x", ".hidden", ""):
        with pytest.raises(MachineError, match="no machine named"):
            store.load(name)
        with pytest.raises(MachineError, match="no machine named"), store.locked(name):
            pass
    assert not (tmp_path / "lock").exists() and not (tmp_path / "machines").exists()


def _remove_while_held(home, ready, release):
    store = Store(home)
    with store.locked("m") as machine:
        ready.set()
        release.wait(5)
        store.delete(machine)


def test_a_command_waiting_for_the_lock_of_a_machine_being_removed_stops(tmp_path):
    store = Store(tmp_path)
    reserve(store, "m")
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    remover = multiprocessing.Process(target=_remove_while_held, args=(tmp_path, ready, release))
    remover.start()
    outcome: list[BaseException] = []

    def wait_for_lock() -> None:
        try:
            with store.locked("m", timeout=10):
                pass
        except MachineError as e:
            outcome.append(e)

    try:
        assert ready.wait(5)
        waiter = threading.Thread(target=wait_for_lock)
        waiter.start()
        time.sleep(0.3)  # the waiter has opened the lock file and waits on it
        release.set()
        waiter.join(10)
    finally:
        remover.join()
    assert len(outcome) == 1 and "removed while this command waited" in str(outcome[0])
    assert store.names() == [] and [p.name for p in store.machines_dir.iterdir()] == []


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
