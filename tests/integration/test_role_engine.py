"""The role engine against a real local machine: converge, re-run without changes, detect drift in check mode.

How fast a no-op re-run is belongs to bench/provision.py (the full role set, medians), not to a test here.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from machine import commands
from machine.roles import TextReporter, run_roles
from machine.store import CACHE_ENV, Store
from tests.integration.conftest import BRIDGE, CACHE, SUBNET, bridge_leftovers, leftovers

pytestmark = pytest.mark.integration

ROLES = Path(__file__).parent / "roles_fixture" / "roles"
NAME = "re1"


class Recorder(TextReporter):
    """The text output (shown by pytest on failure) plus the statuses per task label."""

    def __init__(self) -> None:
        super().__init__(io.StringIO())
        self.statuses: list[tuple[str, str]] = []
        self.diffs: list[str] = []

    def task_result(self, host, task, result):
        super().task_result(host, task, result)
        self.statuses.append((task.label, result.status))
        if result.diff:
            self.diffs.append(result.diff)

    def changed(self) -> list[str]:
        return [label for label, status in self.statuses if status == "changed"]


@pytest.fixture(scope="module")
def conn(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("local machines need root")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, CACHE)  # the suite's cached base image, not a debootstrap of our own
        store = Store(tmp_path_factory.mktemp("home"))
        machine_dir = store.machines_dir / NAME
        try:
            commands.create(store, NAME, "local", {"local_bridge": BRIDGE, "local_subnet": SUBNET}, provision=False)
            record = json.loads((machine_dir / "config.json").read_text())
            machine, driver = commands.load(store, NAME)
            connection = commands.connect(machine, driver)
            yield connection
            connection.close()
        finally:
            if store.exists(NAME):
                commands.rm(store, NAME, force=True)
    # Reached once the machine was made and the tests ran: whatever rm left behind fails the module.
    assert leftovers(record, machine_dir) == []
    assert bridge_leftovers() == []


def play(conn, roles=("retest",), **kw):
    rec = Recorder()
    recap = run_roles(conn, list(roles), ROLES, kw.pop("extra_vars", {}), reporter=rec, host_name=NAME, **kw)
    print(rec.stream.getvalue())
    return recap, rec


def sh(conn, cmd: str) -> str:
    return conn.run(cmd, check=True).stdout


def test_converge_then_no_changes_then_drift_in_check_mode(conn):
    first, rec = play(conn)
    assert first.failed == 0, first.failure
    assert first.changed > 10
    assert first.rescued == 1

    # What the roles promised is on the host.
    assert sh(conn, "cat /etc/pmtest/pmtest.conf").splitlines()[1:] == [
        "greeting = hello", f"host = {NAME} (Debian 12)", f"address = {sh(conn, 'hostname -I').split()[0]}",
        "listen = 80", "listen = 443"]
    assert sh(conn, "stat -c %a /etc/pmtest/static.txt").strip() == "600"
    assert sh(conn, "cat /etc/pmtest/settings") == "answer=42\ncolour=blue\nsize=large\n"
    assert sh(conn, "cat /var/tmp/pmtest-fetched.txt") == "static content\n"
    assert sh(conn, "cat /proc/sys/net/ipv4/tcp_keepalive_time").strip() == "600"
    assert sh(conn, "systemctl is-active pmtest; systemctl is-enabled pmtest").split() == ["active", "enabled"]
    # Started by its task, then restarted once by the handler notified twice.
    assert sh(conn, "cat /var/lib/pmtest-starts").split() == ["started", "started"]
    assert sh(conn, "id -nG pmuser").split() == ["pmuser", "pmgrp"]
    assert sh(conn, "command -v tree").strip() == "/usr/bin/tree"
    assert sh(conn, "readlink /etc/pmtest.conf").strip() == "/etc/pmtest/pmtest.conf"

    # A second run over the same connection changes nothing (and restarts nothing).
    second, rec = play(conn)
    assert second.failed == 0, second.failure
    assert (second.changed, rec.changed()) == (0, [])
    assert sh(conn, "cat /var/lib/pmtest-starts").split() == ["started", "started"]

    # Drift made by hand: check mode reports exactly that, with a diff, and leaves it alone.
    sh(conn, "sed -i s/answer=42/answer=41/ /etc/pmtest/settings")
    drift, rec = play(conn, check=True, diff=True)
    assert drift.failed == 0, drift.failure
    assert rec.changed() == ["retest : Set the answer"]
    assert len(rec.diffs) == 1 and "-answer=41\n+answer=42" in rec.diffs[0]
    assert sh(conn, "head -n1 /etc/pmtest/settings") == "answer=41\n"

    _, rec = play(conn)
    assert rec.changed() == ["retest : Set the answer"]
    assert sh(conn, "head -n1 /etc/pmtest/settings") == "answer=42\n"


def test_failing_task_names_the_task_and_its_line(conn):
    recap, rec = play(conn, roles=("refail",))
    assert (recap.failed, recap.ok) == (1, 2)
    assert recap.failure.label == "refail : This one fails"
    assert recap.failure.where == "roles/refail/tasks/main.yml:5"
    assert "non-zero return code (rc=2): no such thing" in recap.failure.msg
    assert rec.stream.getvalue().splitlines()[-2] == (
        f"{NAME} : ok=2 changed=1 unreachable=0 failed=1 skipped=0 rescued=0 ignored=0")


def test_tags_select_tasks(conn):
    recap, rec = play(conn, tags=["broken"])
    assert recap.failure is not None and "a never-tagged task ran" in recap.failure.msg
    assert [label for label, _ in rec.statuses] == ["Gathering Facts", "retest : Only when asked for"]


def test_scripts_in_the_kept_shell_run_each_on_its_own(conn):
    """The engine's scripts run by `eval` in the kept shell's subshells: a syntax error, an exit, a trap or a
    variable of one reaches neither the shell nor the next script."""
    from machine.roles.remote import Remote

    remote = Remote(conn)
    broken = remote.run("if then")
    assert broken.rc == 2 and "Syntax error" in broken.stderr
    ended = remote.run("x=1; cd /tmp; trap 'echo bye' EXIT; exit 3")
    assert (ended.rc, ended.stdout) == (3, "bye\n")
    after = remote.run('echo "${x:-unset} $(pwd)"').stdout
    assert after.startswith("unset ") and after != "unset /tmp\n"
    assert remote.run("echo unterminated 'quote").rc == 2  # one quoted word: the shell does not wait for more
    assert remote.run("cat", stdin=b"in\n").stdout == "in\n"
    assert remote.run('echo "$A"', env={"A": "b c"}).stdout == "b c\n"


def test_units_read_ahead_are_each_their_own(conn, tmp_path):
    """Two service tasks in a row have their units read by one `systemctl show`: each acts on its own unit's
    state (one started, the other stopped), and a second run finds both as wanted."""
    unit = "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n"
    tasks = tmp_path / "roles" / "units" / "tasks"
    tasks.mkdir(parents=True)
    (tasks / "main.yml").write_text(
        "".join(f"- copy: {{dest: /etc/systemd/system/pm-{u}.service, content: {json.dumps(unit)}}}\n" for u in "ab")
        + "- systemd: {daemon_reload: true}\n"
        "- command: systemctl start pm-b\n"  # b runs, a does not
        "  changed_when: false\n"
        "- service: {name: pm-a, state: started}\n"
        "- service: {name: pm-b, state: stopped}\n")
    commands: list[str] = []

    class Recording:  # the connection, each command noted (run one channel each: not machine.ssh's kept shells)
        endpoint = conn.endpoint

        def run(self, command: str, **kw):
            commands.append(command)
            return conn.run(command, **kw)

    rec = Recorder()
    recap = run_roles(Recording(), ["units"], tmp_path / "roles", {}, reporter=rec, host_name=NAME)
    assert recap.failed == 0, recap.failure
    assert rec.changed()[-2:] == ["units : service", "units : service"], rec.statuses
    assert sh(conn, "systemctl is-active pm-a pm-b || true").split() == ["active", "inactive"]
    assert [c for c in commands if "systemctl show" in c and "pm-a" in c and "pm-b" in c], commands
