"""The play: handlers, tags, blocks, loops, registers, precedence, failures - run for real in a local shell."""

from __future__ import annotations

import getpass
import io
import json
import os
import subprocess
from types import SimpleNamespace

import pytest

from machine.roles import RoleError, TextReporter, run_roles
from machine.roles.executor import selected
from machine.ssh import Connection, Result


class Events:
    def __init__(self) -> None:
        self.results: list[tuple[str, str, str | None, str]] = []

    def task_start(self, host, task):
        pass

    def task_result(self, host, task, result):
        self.results.append((task.label, result.status, result.item, result.msg))

    def recap(self, recap):
        self.final = recap

    def labels(self, status: str | None = None) -> list[str]:
        return [label for label, st, _, _ in self.results if status is None or st == status]


def play(shell, path, roles=("r",), **kw):
    events = Events()
    recap = run_roles(shell, list(roles), path, kw.pop("extra_vars", {}), reporter=events, **kw)
    return recap, events


def test_handlers_run_once_in_definition_order_at_the_end(shell, roles, tmp_path):
    log = tmp_path / "log"
    path = roles("r", tasks=f"""
        - name: change one
          command: echo one
          notify: [second, first]
        - name: change two
          command: echo two
          notify: first
        - name: unchanged
          command: echo three
          changed_when: false
          notify: third
        - name: last task
          shell: echo task >> {log}
        """, handlers=f"""
        - name: first
          shell: echo first >> {log}
        - name: second
          shell: echo second >> {log}
          notify: chained
        - name: third
          shell: echo third >> {log}
        - name: chained handler
          shell: echo chained >> {log}
          listen: chained
        """)
    recap, _ = play(shell, path)
    assert log.read_text().split() == ["task", "first", "second", "chained"]
    assert recap.failed == 0 and recap.changed == 6


def test_flush_handlers(shell, roles, tmp_path):
    log = tmp_path / "log"
    path = roles("r", tasks=f"""
        - command: "true"
          notify: h
        - meta: flush_handlers
        - shell: echo after >> {log}
        """, handlers=f"""
        - name: h
          shell: echo handler >> {log}
        """)
    play(shell, path)
    assert log.read_text().split() == ["handler", "after"]


@pytest.mark.parametrize(("only", "skip", "expected"), [
    (None, None, ["plain", "web", "always"]),
    (["web"], None, ["web", "always"]),
    (["debugging"], None, ["debug only", "always"]),
    (["never"], None, ["debug only", "always"]),
    (["all"], ["web"], ["plain", "always"]),
    (["tagged"], None, ["web", "always"]),
    (["untagged"], None, ["plain", "always"]),
    (["web"], ["always"], ["web"]),
    (None, ["all"], ["always"]),
])
def test_tag_selection(shell, roles, only, skip, expected):
    path = roles("r", tasks="""
        - {name: plain, debug: {msg: x}}
        - {name: web, debug: {msg: x}, tags: [web]}
        - {name: debug only, debug: {msg: x}, tags: [never, debugging]}
        - {name: always, debug: {msg: x}, tags: always}
        """)
    _, events = play(shell, path, tags=only, skip_tags=skip)
    assert [label.split(" : ")[1] for label in events.labels()[1:]] == expected


def test_special_tag_rules():
    assert selected(frozenset(), frozenset({"all"}), frozenset())
    assert not selected(frozenset({"never"}), frozenset({"all"}), frozenset())
    assert selected(frozenset({"always"}), frozenset({"x"}), frozenset())


def test_block_rescue_always_and_recap(shell, roles):
    path = roles("r", tasks="""
        - name: guarded
          block:
            - name: will fail
              command: "false"
            - name: not reached
              debug: msg=no
          rescue:
            - name: rescuing
              set_fact:
                saved_by: "{{ ansible_failed_task.name }}"
          always:
            - name: cleanup
              debug: msg=always
        - name: check rescue
          assert:
            that: "saved_by == 'will fail'"  # as Ansible: the task's own name
        """)
    recap, events = play(shell, path)
    assert recap.failed == 0 and recap.rescued == 1
    assert "r : not reached" not in events.labels()
    assert recap.line == "web1 : ok=4 changed=0 unreachable=0 failed=0 skipped=0 rescued=1 ignored=0"


def test_failure_stops_the_play_and_names_task_file_and_line(shell, roles):
    path = roles("r", tasks="""
        - name: fine
          command: "true"
        - name: breaks
          shell: echo oops >&2; exit 3
        - name: never runs
          debug: msg=x
        """, handlers="- {name: h, debug: {msg: h}}\n")
    out = io.StringIO()
    recap = run_roles(shell, ["r"], path, reporter=TextReporter(out))
    assert recap.failed == 1
    assert recap.failure.where == "roles/r/tasks/main.yml:3"
    assert recap.failure.label == "r : breaks"
    assert "non-zero return code (rc=3): oops" in recap.failure.msg
    text = out.getvalue()
    assert "fatal: [web1] => r : breaks" in text and "never runs" not in text
    assert text.splitlines()[-2] == "web1 : ok=2 changed=1 unreachable=0 failed=1 skipped=0 rescued=0 ignored=0"


def test_ignore_errors_failed_when_changed_when_register(shell, roles):
    path = roles("r", tasks="""
        - name: ignored
          command: "false"
          ignore_errors: true
        - name: probe
          shell: echo -n found; exit 1
          register: probe
          failed_when: probe.rc not in [0, 1]
          changed_when: probe.stdout == 'changed'
        - name: use it
          assert:
            that:
              - probe.rc == 1
              - probe.stdout == 'found'
              - probe is not changed
              - probe is succeeded
              - probe.msg == 'non-zero return code'
              - probe.failed_when_result == false
        """)
    recap, _ = play(shell, path)
    # As ansible-playbook 2.19: the ignored failure counts as ok and ignored, and changed (a command that ran)
    assert (recap.ignored, recap.failed, recap.changed, recap.ok) == (1, 0, 1, 4)


def test_loops_loop_control_and_registered_results(shell, roles):
    path = roles("r", tasks="""
        - name: each
          shell: echo {{ idx }}-{{ pkg.name }}
          loop: "{{ pkgs }}"
          loop_control: {loop_var: pkg, index_var: idx, label: "{{ pkg.name }}"}
          when: pkg.wanted
          register: out
        - name: legacy
          debug: msg={{ item }}
          with_items: [[a, b], c]
          register: legacy
        - name: check
          assert:
            that:
              - out.results | length == 3
              - out.results[0].stdout == '0-a'
              - out.results[1] is skipped
              - out.results[2].pkg.name == 'c'
              - out is changed
              - legacy.results | map(attribute='item') | list == ['a', 'b', 'c']
        """, defaults="""
        pkgs:
          - {name: a, wanted: true}
          - {name: b, wanted: false}
          - {name: c, wanted: true}
        """)
    recap, events = play(shell, path)
    assert recap.failed == 0, recap.failure
    items = [(st, item) for label, st, item, _ in events.results if label == "r : each"]
    assert items == [("changed", "a"), ("skipped", "b"), ("changed", "c")]


def test_variable_precedence(shell, roles):
    roles("dep", tasks="- {name: dep sees its params, assert: {that: [who == 'param']}}\n",
          defaults="who: dep-default\n")
    path = roles("r", tasks="""
        - name: defaults < role vars < task vars
          assert:
            that: [a == 'role-vars', b == 'task', c == 'extra', d == 'default', e == 'default']
          vars: {b: task, c: task}
        - set_fact: {e: from-fact, a: from-fact}
        - name: set_fact beats role vars; extra vars beat all
          assert: {that: [a == 'from-fact', c == 'extra', e == 'from-fact']}
        """, defaults="{a: default, b: default, c: default, d: default, e: '{{ d }}'}\n",
        vars="{a: role-vars}\n", meta="dependencies: [{role: dep, who: param}]\n")
    recap, _ = play(shell, path, extra_vars={"c": "extra"})
    assert recap.failed == 0, recap.failure


def test_include_and_import_tasks(shell, roles, tmp_path):
    path = roles("r", tasks="""
        - import_tasks: imported.yml
          when: run_imported
        - include_tasks: "{{ which }}.yml"
          loop: [1, 2]
          vars: {suffix: x}
        """, defaults="{run_imported: true, which: included}\n", files={
        "tasks/imported.yml": "- {name: imported, debug: {msg: imp}}\n",
        "tasks/included.yml": "- {name: included, command: 'echo {{ item }}{{ suffix }}', register: inc}\n"
                              "- {name: check, assert: {that: \"inc.stdout == item ~ 'x'\"}}\n",
    })
    recap, events = play(shell, path)
    assert recap.failed == 0, recap.failure
    assert events.labels("included") == ["r : include_tasks", "r : include_tasks"]
    assert events.labels().count("r : check") == 2


def test_included_tasks_as_ansible_runs_them(shell, roles):
    """Checked against ansible-playbook 2.19: an include's vars rank above set_fact (and the included tasks' own
    vars); a block's when is checked again for each included task; the include's ignore_errors is its own."""
    path = roles("r", tasks="""
        - set_fact: {x: from_set_fact}
        - include_tasks: vars.yml
          vars: {x: from_include_vars}
        - block:
            - include_tasks: when.yml
          when: go | bool
          vars: {go: true}
        - block:
            - include_tasks: fails.yml
              ignore_errors: true
          rescue:
            - {name: rescued, debug: {msg: rescued}}
        """, files={
        "tasks/vars.yml": """
            - {name: sees, assert: {that: x == 'from_include_vars'}}
            - {name: own vars, assert: {that: x == 'from_include_vars'}, vars: {x: own}}
            """,
        "tasks/when.yml": """
            - {name: first, debug: {msg: first}}
            - set_fact: {go: false}
            - {name: second, debug: {msg: second}}
            """,
        "tasks/fails.yml": "- {name: inner, fail: {msg: inner-fail}}\n- {name: after inner, debug: {msg: x}}\n",
    })
    recap, events = play(shell, path)
    assert recap.failed == 0, recap.failure
    assert {"r : sees", "r : own vars", "r : first"} <= set(events.labels("ok"))
    assert events.labels("skipped") == ["r : second"]
    assert events.labels("failed") == ["r : inner"] and "r : after inner" not in events.labels()
    assert (recap.rescued, recap.ignored, events.labels()[-1]) == (1, 0, "r : rescued")


def test_an_empty_loop_skips_the_task(shell, roles):
    path = roles("r", tasks="""
        - {name: empty, debug: {msg: "{{ item }}"}, loop: [], register: e}
        - {name: check, assert: {that: [e is skipped, e.results | length == 0, e is not changed]}}
        """)
    recap, events = play(shell, path)
    assert recap.failed == 0, recap.failure
    assert (events.labels("skipped"), recap.skipped) == (["r : empty"], 1)


def test_a_rescue_gets_the_failed_tasks_whole_result(shell, roles):
    path = roles("r", tasks="""
        - block:
            - {name: fails, shell: "echo out; echo err >&2; exit 3"}
          rescue:
            - assert:
                that:
                  - ansible_failed_result.rc == 3
                  - ansible_failed_result.stdout == 'out' and ansible_failed_result.stderr_lines == ['err']
                  - ansible_failed_result.msg == 'non-zero return code' and ansible_failed_result is failed
        - block:
            - {name: fails in a loop, command: "false", loop: [1]}
          rescue:
            - assert: {that: "ansible_failed_result.results[0].rc == 1"}
        """)
    recap, _ = play(shell, path)
    assert (recap.failed, recap.rescued) == (0, 2), recap.failure


def test_debug_with_a_verbosity_is_skipped_as_without_dash_v(shell, roles):
    path = roles("r", tasks="""
        - {name: verbose, debug: {msg: hidden, verbosity: 1}, register: d}
        - {name: plain, debug: {msg: "shown", verbosity: 0}}
        - assert: {that: d is skipped}
        """)
    recap, events = play(shell, path)
    assert recap.failed == 0, recap.failure
    assert (events.labels("skipped"), recap.skipped) == (["r : verbose"], 1)
    assert ("r : plain", "ok", None, "shown") in events.results


def test_undefined_variable_fails_the_task_clearly(shell, roles):
    path = roles("r", tasks="- {name: uses it, debug: {msg: '{{ nowhere }}'}}\n")
    recap, _ = play(shell, path)
    assert recap.failure.where == "roles/r/tasks/main.yml:1"
    assert "'nowhere' is undefined" in recap.failure.msg


def test_check_mode_changes_nothing(shell, roles, tmp_path):
    target = tmp_path / "out.txt"
    path = roles("r", tasks=f"""
        - copy: {{dest: {target}, content: "hello\\n"}}
        - command: touch {tmp_path}/touched
        - command: touch {tmp_path}/created
          check_mode: false
        """)
    recap, _ = play(shell, path, check=True, diff=True)
    assert not target.exists() and not (tmp_path / "touched").exists()
    assert (tmp_path / "created").exists()  # check_mode: false runs for real
    assert recap.changed == 2 and recap.skipped == 1


def test_become_wraps_in_sudo_only_for_non_root(shell):
    from machine.roles.remote import Become, Remote
    shell.endpoint.user = "admin"
    cmd = Remote(shell).command("id -u", Become(True))
    # sudo is asked for the shell alone (a sudoers rule may allow only /bin/sh); the shell runs the rest as root.
    assert cmd == "sudo -n -H -u root -- sh -c 'exec \"$@\"' sh env LC_ALL=C sh -c 'id -u'"
    shell.endpoint.user = "root"
    assert Remote(shell).command("id -u", Become(True)) == "env LC_ALL=C sh -c 'id -u'"


class _KeptShell(Connection):
    """A Connection whose commands go to the shell their launcher starts (one shell per command here)."""

    def __init__(self) -> None:  # no SSH: the launcher runs on this host
        self.endpoint = SimpleNamespace(user=getpass.getuser(), host="localhost")
        self.launchers: list[str] = []

    def run(self, command, *, stdin=None, check=False, timeout=None, stream=None, shell=None):
        self.launchers.append(shell)
        proc = subprocess.run(["sh", "-c", shell], input=command.encode(), capture_output=True, timeout=60)
        return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_commands_run_in_the_c_locale_whatever_the_targets(shell, monkeypatch):
    from machine.roles.remote import Remote
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    kept = _KeptShell()
    for conn in (shell, kept):
        assert Remote(conn).run('echo "$LC_ALL"').stdout == "C\n"
        assert Remote(conn).run('echo "$LC_ALL $X"', env={"X": "1"}).stdout == "C 1\n"
        assert Remote(conn).run('echo "$LC_ALL"', env={"LC_ALL": "POSIX"}).stdout == "POSIX\n"  # the task's wins
    assert len(shell.commands) == 3 and set(kept.launchers) == {"env LC_ALL=C sh"}  # once, when the shell starts


def test_validation_happens_before_anything_runs(shell, roles):
    path = roles("r", tasks="- command: touch /tmp/should-not-exist\n- frob: {}\n")
    with pytest.raises(RoleError, match=r"roles/r/tasks/main.yml:2: unknown module 'frob'"):
        play(shell, path)
    assert shell.commands == []


def test_debug_var_and_to_json(shell, roles):
    path = roles("r", tasks="- {debug: {var: stuff}}\n- {debug: {msg: '{{ stuff | to_json }}'}}\n",
                 defaults="stuff: {a: [1]}\n")
    _, events = play(shell, path)
    assert json.loads(events.results[-1][3]) == {"a": [1]}


def test_environment_and_no_log(shell, roles):
    path = roles("r", tasks="""
        - name: secret
          shell: echo "$GREETING $TOKEN"
          environment: {GREETING: hi}
          vars: {token_value: s3cret}
          register: out
          no_log: true
        - assert: {that: "out.stdout == 'hi '"}
        """)
    recap, events = play(shell, path)
    assert recap.failed == 0, recap.failure
    assert all("hi" not in msg for label, _, _, msg in events.results if label == "r : secret")


def test_no_log_censors_loop_labels_and_the_failure(shell, roles):
    path = roles("r", defaults="creds: [{name: bob, pw: s3cret}]\n", tasks="""
        - name: secrets loop
          debug: msg="setting {{ item.name }}"
          loop: "{{ creds }}"
          no_log: true
        - name: secret fail
          fail: msg="token {{ creds[0].pw }} rejected"
          no_log: true
        """)
    out = io.StringIO()
    recap = run_roles(shell, ["r"], path, reporter=TextReporter(out))
    assert "(item=(censored due to no_log))" in out.getvalue()
    assert "s3cret" not in out.getvalue() and "s3cret" not in str(recap.failure)


def test_keywords_given_as_templates_are_templated_with_the_task_variables(shell, roles, tmp_path):
    target = tmp_path / "dry"
    path = roles("r", defaults="dry: true\nhide: true\ntolerate: true\nsudo: false\n", tasks=f"""
        - name: secret
          debug: msg=password=hunter2
          no_log: "{{{{ hide }}}}"
        - copy: {{content: x, dest: {target}}}
          check_mode: "{{{{ dry }}}}"
        - name: tolerated
          fail: msg=boom
          ignore_errors: "{{{{ tolerate }}}}"
        - block:
            - name: in block
              command: "true"
              become: "{{{{ sudo }}}}"
          become: "{{{{ not sudo }}}}"
        """)
    shell.endpoint.user = "admin"
    recap, events = play(shell, path)
    assert recap.failed == 0 and recap.ignored == 1, recap.failure
    assert not target.exists()
    assert all("hunter2" not in msg for _, _, _, msg in events.results)
    assert not any("sudo" in c for c in shell.commands)


def test_a_keyword_template_that_fails_fails_its_task(shell, roles):
    path = roles("r", tasks="- {name: bad, command: 'true', become: '{{ nope }}'}\n")
    recap, _ = play(shell, path)
    assert recap.failure.where == "roles/r/tasks/main.yml:1" and "nope" in recap.failure.msg


def test_missing_dynamic_include_fails_the_task(shell, roles):
    path = roles("r", tasks="- include_tasks: '{{ which }}.yml'\n", defaults="which: nothere\n")
    recap, _ = play(shell, path)
    assert recap.failure.where == "roles/r/tasks/main.yml:1"
    assert "roles/r/tasks/nothere.yml: no such task file" in recap.failure.msg


def test_assert_keeps_one_condition_with_commas_whole(shell, roles):
    path = roles("r", tasks="- {name: in a list, assert: {that: \"'b' in ['a', 'b']\"}}\n")
    recap, _ = play(shell, path)
    assert recap.failed == 0 and recap.failure is None


def test_more_roles_join_the_play_each_found_in_its_own_path(shell, roles, tmp_path):
    shipped = roles("base", tasks="- debug: msg=shipped-base\n")
    roles("engine", tasks="- debug: msg=engine\n", meta="dependencies: [base]\n")
    own = tmp_path / "own"
    (own / "base" / "tasks").mkdir(parents=True)  # named like a shipped role: runs only where it is asked for
    (own / "base" / "tasks" / "main.yml").write_text("- debug: msg=own-base\n")
    (own / "extra" / "tasks").mkdir(parents=True)
    (own / "extra" / "tasks" / "main.yml").write_text("- set_fact: {seen: '{{ engine_var }}'}\n- debug: var=seen\n")
    (own / "extra" / "meta").mkdir()
    (own / "extra" / "meta" / "main.yml").write_text("dependencies: [base]\n")
    recap, events = play(shell, shipped, roles=("engine",), extra_vars={"engine_var": 1},
                         more=[(["extra"], [own, shipped])])
    assert not recap.failed, recap.failure
    # One play (one fact gathering): the shipped base once, the fleet's own base as extra's dependency.
    assert events.labels() == ["Gathering Facts", "base : debug", "engine : debug", "base : debug",
                               "extra : set_fact", "extra : debug"]
    assert [m for _, _, _, m in events.results if "base" in m] == ["shipped-base", "own-base"]


def test_more_roles_already_in_the_play_run_once(shell, roles):
    path = roles("base", tasks="- debug: msg=base\n")
    recap, events = play(shell, path, roles=("base",), more=[(["base"], path)])
    assert recap.ok == 2
    assert events.labels() == ["Gathering Facts", "base : debug"]


def test_file_tasks_in_a_row_read_their_files_with_one_command(shell, roles, tmp_path):
    """A directory, a template, a looped copy and a removal in a row: one command reads all their files (two
    programs), none probes on its own, and each still reports what it found; a second run changes nothing."""
    conf, keep, gone = tmp_path / "conf", tmp_path / "keep.txt", tmp_path / "gone.txt"
    keep.write_text("kept\n")
    gone.write_text("old\n")
    path = roles("r", tasks=f"""
        - file: {{path: {conf}, state: directory, mode: "0755"}}
        - template: {{src: t.j2, dest: "{conf}/t.conf", mode: "0644"}}
        - copy: {{dest: "{{{{ item.dest }}}}", content: "{{{{ item.text }}}}"}}
          loop:
            - {{dest: {keep}, text: "kept\\n"}}
            - {{dest: {conf}/new.txt, text: "new\\n"}}
        - file: {{path: {gone}, state: absent}}
        """, files={"templates/t.j2": "x={{ 1 + 1 }}\n"})
    recap, events = play(shell, path)
    assert recap.failed == 0 and recap.changed == 4, events.results  # dir, template, new.txt, removal
    assert (conf / "t.conf").read_text() == "x=2\n" and (conf / "new.txt").read_text() == "new\n"
    assert not gone.exists()
    shell.commands.clear()
    recap, events = play(shell, path)
    assert recap.changed == 0 and recap.ok == 5, events.results  # facts, dir, template, the copies, removal
    # Facts, then the five files read at once: stat of all five, sha256sum of the regular ones.
    assert len(shell.commands) == 2, shell.commands
    assert "sha256sum --" in shell.commands[1] and str(gone) in shell.commands[1]


def test_file_tasks_read_ahead_compare_a_numeric_owner_as_a_number(shell, roles, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).write_text("x")
    path = roles("r", tasks=f"""
        - file: {{path: {tmp_path}/a, owner: "{os.getuid()}", group: "{os.getgid()}"}}
        - file: {{path: {tmp_path}/b, owner: "{os.getuid()}"}}
        """)
    recap, _ = play(shell, path)
    assert recap.changed == 0 and recap.failed == 0, recap.failure
    assert len(shell.commands) == 2  # the facts, then one read for both


def test_a_command_between_file_tasks_makes_them_read_their_files_again(shell, roles, tmp_path):
    """Files read ahead are forgotten as soon as any command runs: a task that changes a file the next task
    manages (behind the play's back) is seen by that task."""
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    path = roles("r", tasks=f"""
        - copy: {{dest: {first}, content: "one\\n"}}
        - command: sh -c 'echo other > {second}'
          changed_when: false
        - copy: {{dest: {second}, content: "two\\n"}}
        """)
    first.write_text("one\n")
    second.write_text("two\n")  # what was read ahead: the copy would find nothing to do
    recap, events = play(shell, path)
    assert second.read_text() == "two\n" and recap.changed == 1, events.results  # the command's edit was seen


def test_after_a_task_of_a_read_ahead_writes_the_rest_are_read_again_with_one_command(shell, roles, tmp_path):
    """The tasks of one read-ahead trust what it found only while no command ran: once the first copy writes,
    the next two (already right) are read again, together, and neither probes on its own."""
    first, second, third = (tmp_path / f"{n}.txt" for n in ("first", "second", "third"))
    second.write_text("two\n")
    third.write_text("three\n")
    path = roles("r", tasks=f"""
        - copy: {{dest: {first}, content: "one\\n"}}
        - copy: {{dest: {second}, content: "two\\n"}}
        - copy: {{dest: {third}, content: "three\\n"}}
        """)
    recap, events = play(shell, path)
    assert first.read_text() == "one\n" and recap.changed == 1 and recap.ok == 4, events.results
    writes = [i for i, c in enumerate(shell.commands) if "mktemp" in c]
    later = [c for c in shell.commands[writes[-1] + 1:] if str(second) in c or str(third) in c]
    assert len(later) == 1 and str(second) in later[0] and str(third) in later[0], shell.commands


def test_a_copy_into_a_directory_read_ahead_still_lands_inside_it(shell, roles, tmp_path):
    """What was read ahead of a copy's dest says it is a directory: the copy probes for itself and writes the file
    into it under the source's name, as Ansible does."""
    into, other = tmp_path / "into", tmp_path / "other.txt"
    into.mkdir()
    path = roles("r", tasks=f"""
        - copy: {{src: a.txt, dest: {into}}}
        - copy: {{dest: {other}, content: "b\\n"}}
        """, files={"files/a.txt": "a\n"})
    recap, events = play(shell, path)
    assert recap.changed == 2, events.results
    assert (into / "a.txt").read_text() == "a\n" and other.read_text() == "b\n"
    assert any("sha256sum --" in c for c in shell.commands)  # both dests were read ahead


def test_a_file_task_looping_over_nothing_reads_nothing_ahead(shell, roles, tmp_path):
    """A loop over an empty list (the engine role's extra files, say) names no file to read: the play goes on to
    the tasks after it, which still read ahead and act."""
    after = tmp_path / "after.txt"
    path = roles("r", tasks=f"""
        - copy: {{dest: "{{{{ item }}}}", content: "x\\n"}}
          loop: []
        - copy: {{dest: {after}, content: "after\\n"}}
        """)
    recap, events = play(shell, path)
    assert recap.failed == 0 and recap.changed == 1, events.results
    assert after.read_text() == "after\n"


def test_a_skipped_result_is_not_judged_by_changed_when_or_failed_when(shell, roles):
    """As ansible-playbook 2.19 --check: a command skipped in check mode is reported skipped, its changed_when and
    failed_when (which read what only a real run returns) left unevaluated."""
    path = roles("r", tasks="""
        - name: probe
          command: echo hi
          register: p
          changed_when: p.rc != 0
          failed_when: p.stdout == 'no'
        """)
    recap, events = play(shell, path, check=True)
    assert recap.failed == 0, recap.failure
    assert (events.labels("skipped"), recap.skipped) == (["r : probe"], 1)


def test_a_template_or_condition_that_fails_fails_its_task_which_ignore_errors_and_register_still_handle(shell, roles):
    """As ansible-playbook 2.19: the task fails, its failure is ignored and registered, and the play goes on; an
    error in failed_when or changed_when is kept in failed_when_result or changed_when_result."""
    path = roles("r", tasks="""
        - {name: bad msg, debug: {msg: "{{ nope }}"}, ignore_errors: true, register: u}
        - {name: bad when, debug: {msg: x}, when: nope2 == 1, ignore_errors: true, register: w}
        - {name: bad failed_when, command: echo x, failed_when: zzz == 1, ignore_errors: true, register: f}
        - {name: bad changed_when, command: echo x, changed_when: zzz == 1, ignore_errors: true, register: c}
        - {name: bad item, debug: {msg: "{{ item.x }}"}, loop: [1], ignore_errors: true, register: i}
        - name: check
          assert:
            that:
              - u is failed and "'nope' is undefined" in u.msg
              - w is failed and "'nope2' is undefined" in w.msg
              - f is failed and "'zzz' is undefined" in f.failed_when_result and f.stdout == 'x'
              - c is failed and "'zzz' is undefined" in c.changed_when_result
              - i is failed and i.results[0] is failed
        - {name: not ignored, command: echo x, failed_when: zzz == 1}
        """)
    recap, events = play(shell, path)
    assert events.labels("failed") == ["r : bad msg", "r : bad when", "r : bad failed_when", "r : bad changed_when",
                                       "r : bad item", "r : not ignored"]
    assert (recap.ignored, recap.failed) == (5, 1)
    assert recap.failure.label == "r : not ignored" and "'zzz' is undefined" in recap.failure.msg


def test_the_recap_counts_ignored_failures_and_included_files_as_ansible(shell, roles, tmp_path):
    """Checked against ansible-playbook 2.19: an ignored failure counts as ok, ignored and (having run) changed,
    but notifies nothing; an include counts as ok once per file it includes (per loop item), the skipped and
    failed ones not."""
    log = tmp_path / "log"
    path = roles("r", tasks="""
        - {name: ignored, command: "false", ignore_errors: true, notify: h}
        - include_tasks: inc.yml
        - include_tasks: inc.yml
          loop: [1, 2, 3]
          when: item != 2
        - {include_tasks: "{{ nope }}.yml", ignore_errors: true}
        """, handlers=f"- {{name: h, shell: echo h >> {log}}}\n", files={"tasks/inc.yml": "- debug: msg=hi\n"})
    recap, events = play(shell, path)
    assert recap.failed == 0, recap.failure
    assert events.labels("included") == ["r : include_tasks"] * 3
    assert recap.line == "web1 : ok=9 changed=1 unreachable=0 failed=0 skipped=0 rescued=0 ignored=2"
    assert not log.exists()


def test_retries_as_ansible_with_or_without_until(shell, roles, tmp_path):
    """Checked against ansible-playbook 2.19: `retries` alone retries until the task does not fail; `until` alone
    allows 3 retries; once they run out the task fails with its module's msg and `attempts` one short of the
    runs made; `retries: 0` runs once, without `attempts`."""
    runs = tmp_path / "runs"
    path = roles("r", tasks=f"""
        - name: succeeds on the third run
          shell: echo x >> {runs}/a; [ $(wc -l < {runs}/a) -ge 3 ]
          retries: 3
          delay: 0
          register: a
        - name: never succeeds
          shell: echo x >> {runs}/b; exit 1
          retries: 1
          delay: 0
          register: b
          ignore_errors: true
        - name: until alone
          shell: echo x >> {runs}/c
          until: false
          delay: 0
          register: c
          ignore_errors: true
        - {{name: no retries, command: "true", until: false, retries: 0, register: d}}
        - name: check
          assert:
            that:
              - a is succeeded and a.attempts == 3
              - b is failed and b.attempts == 1 and b.msg == 'non-zero return code'
              - c is failed and c.attempts == 3
              - d is succeeded and d.attempts is undefined
        """)
    runs.mkdir()
    recap, _ = play(shell, path)
    assert recap.failed == 0, recap.failure
    assert [len((runs / n).read_text().split()) for n in "abc"] == [3, 2, 4]


def test_meta_tasks_obey_tag_selection(shell, roles):
    """As ansible-playbook 2.19 --tags foo: a meta task tagged otherwise (or in a block tagged otherwise) does
    not run."""
    path = roles("r", tasks="""
        - {name: before, debug: {msg: before}, tags: [foo]}
        - {name: stop, meta: end_play, tags: [other]}
        - {name: after, debug: {msg: after}, tags: [foo]}
        - name: blk
          tags: [other]
          block:
            - {name: stop too, meta: end_play}
        - {name: last, debug: {msg: last}, tags: [foo]}
        """)
    _, events = play(shell, path, tags=["foo"])
    assert events.labels("ok")[-3:] == ["r : before", "r : after", "r : last"]


def test_an_include_loop_hands_its_loop_variables_to_the_included_tasks(shell, roles):
    """As ansible-playbook 2.19: the loop_var, the index_var, ansible_loop_var and ansible_index_var (which a
    looped task's item results carry too)."""
    path = roles("r", tasks="""
        - include_tasks: inc.yml
          loop: [a, b]
          loop_control: {loop_var: x, index_var: idx}
        - {command: "echo {{ x }}", loop: [a], loop_control: {loop_var: x, index_var: idx}, register: reg}
        - assert: {that: "reg.results[0].idx == 0 and reg.results[0].ansible_index_var == 'idx'"}
        """, files={"tasks/inc.yml": """
            - {name: seen, debug: {msg: "{{ x }} {{ idx }} {{ ansible_loop_var }} {{ ansible_index_var }}"}}
            """})
    recap, events = play(shell, path)
    assert recap.failed == 0, recap.failure
    assert [msg for label, _, _, msg in events.results if label == "r : seen"] == ["a 0 x idx", "b 1 x idx"]


def test_ansible_failed_task_name_is_the_tasks_own_name(shell, roles):
    """As ansible-playbook 2.19: without the role's name, and empty for a task without a name."""
    path = roles("r", tasks="""
        - block:
            - {name: boom, command: "false"}
          rescue:
            - set_fact: {named: "{{ ansible_failed_task.name }}"}
        - block:
            - command: "false"
          rescue:
            - assert: {that: "named == 'boom' and ansible_failed_task.name == ''"}
        """)
    recap, _ = play(shell, path)
    assert (recap.failed, recap.rescued) == (0, 2), recap.failure


def test_each_flush_is_one_pass_over_the_handlers_in_definition_order(shell, roles, tmp_path):
    """Checked against ansible-playbook 2.19: a handler notified by another during a flush runs in it only if
    defined after the one running, else at the next flush; the end of a play of roles flushes twice."""
    log = tmp_path / "log"
    path = roles("r", tasks=f"""
        - {{name: t1, shell: echo t1 >> {log}, notify: h2}}
        - meta: flush_handlers
        - {{name: t2, shell: echo t2 >> {log}, notify: h2}}
        """, handlers=f"""
        - {{name: h1, shell: echo h1 >> {log}, notify: h3}}
        - {{name: h2, shell: echo h2 >> {log}, notify: [h1, h3]}}
        - {{name: h3, shell: echo h3 >> {log}}}
        """)
    recap, _ = play(shell, path)
    assert recap.failed == 0, recap.failure
    assert log.read_text().split() == ["t1", "h2", "h3", "t2", "h1", "h2", "h3", "h1", "h3"]


def test_messages_of_internal_modules_and_skipped_loops_as_ansible(shell, roles):
    """As ansible-playbook 2.19: an assertion without fail_msg fails with "Assertion failed"; a loop whose items
    were all skipped says "All items skipped"; a debug msg that templates to None stays None (null)."""
    path = roles("r", tasks="""
        - {name: fails, assert: {that: [false]}, ignore_errors: true, register: a}
        - {name: all skipped, debug: {msg: x}, loop: [1, 2], when: false, register: s}
        - {name: none, debug: {msg: "{{ None }}"}, register: n}
        - {name: default, debug: {}, register: h}
        - assert:
            that:
              - a.msg == 'Assertion failed'
              - s.msg == 'All items skipped' and s is skipped
              - n.msg is none and h.msg == 'Hello world!'
        """)
    recap, _ = play(shell, path)
    assert recap.failed == 0, recap.failure


def test_a_quiet_assert_keeps_its_message_in_the_result_and_only_hides_it(shell, roles):
    """As ansible-playbook 2.19: `quiet` registers success_msg (or "All assertions passed") all the same, and
    the task's line shows no message; without it the message is shown. Nothing of the showing is registered."""
    path = roles("r", tasks="""
        - {name: quiet default, assert: {that: [true], quiet: true}, register: q1}
        - {name: quiet own, assert: {that: [true], quiet: true, success_msg: yay, msg: boo}, register: q2}
        - {name: loud, assert: {that: [true], success_msg: loud yay}, register: q3}
        - {name: quiet failure, assert: {that: [false], quiet: true, msg: boo}, ignore_errors: true}
        - assert:
            that:
              - q1.msg == 'All assertions passed' and q2.msg == 'yay' and q3.msg == 'loud yay'
              - q3.keys() | sort == ['changed', 'failed', 'msg']
            quiet: true
        """)
    out = io.StringIO()
    recap = run_roles(shell, ["r"], path, reporter=TextReporter(out))
    assert recap.failed == 0, recap.failure
    lines = out.getvalue().splitlines()
    assert "ok: [web1] => r : quiet default" in lines and "ok: [web1] => r : quiet own" in lines
    assert "ok: [web1] => r : loud: loud yay" in lines
    assert "failed: [web1] => r : quiet failure: boo ...ignoring" in lines


def test_a_list_with_an_undefined_item_fails_the_task_that_uses_it_whole(shell, roles):
    """As ansible-playbook 2.19: `servers` is defined (its length is known) but a set_fact, a debug msg or a
    loop taking it whole fails naming the missing variable; it never reaches a module with a hole in it."""
    path = roles("r", defaults="servers: ['{{ first }}', '{{ second }}']\nfirst: a\n", tasks="""
        - {name: length, debug: {msg: "{{ servers | length }}"}, register: n}
        - {name: fact, set_fact: {copy: "{{ servers }}"}, ignore_errors: true, register: f}
        - {name: msg, debug: {msg: "{{ servers }}"}, ignore_errors: true, register: m}
        - {name: loop, debug: {msg: "{{ item }}"}, loop: "{{ servers }}", ignore_errors: true, register: l}
        - assert:
            that:
              - n.msg == 2 and copy is undefined
              - f.msg == m.msg == l.msg == "'second' is undefined"
        """)
    recap, _ = play(shell, path)
    assert recap.failed == 0 and recap.ignored == 3, recap.failure


def test_an_item_result_carries_the_loop_var_by_its_own_name_only(shell, roles):
    """As ansible-playbook 2.19: with loop_control's loop_var `i`, an item's registered result has `i` and no
    `item`; a failure names the item by it."""
    path = roles("r", tasks="""
        - {name: named, debug: {msg: "{{ i }}"}, loop: [p], loop_control: {loop_var: i}, register: r}
        - assert:
            that: "'item' not in r.results[0] and r.results[0].i == 'p' and r.results[0].ansible_loop_var == 'i'"
        - {name: failing, fail: {msg: nope}, loop: [q], loop_control: {loop_var: j}}
        """)
    recap, _ = play(shell, path)
    assert recap.failure.label == "r : failing" and recap.failure.msg == "item='q': nope"


def test_a_skipped_result_names_the_condition_that_was_false(shell, roles):
    """As ansible-playbook 2.19's `false_condition`: the first false one, a block's first, one of a list by
    itself, a literal boolean as it is, a template by its value."""
    path = roles("r", tasks="""
        - block:
            - {debug: {msg: x}, when: "2 == 2", register: b1}
          when: [true, "1 == 2"]
        - {debug: {msg: x}, loop: [1, 3], when: [item > 1, item < 3], register: b2}
        - {debug: {msg: x}, when: false, register: b3}
        - {debug: {msg: x}, when: "{{ 1 == 2 }}", register: b4}
        - assert:
            that:
              - b1.false_condition == '1 == 2' and b1.skip_reason == 'Conditional result was False'
              - b2.results | map(attribute='false_condition') | list == ['item > 1', 'item < 3']
              - b3.false_condition is false and b4.false_condition is false
        """)
    recap, _ = play(shell, path)
    assert recap.failed == 0, recap.failure


def test_debug_var_registers_the_variable_alone_and_shows_it(shell, roles):
    """As ansible-playbook 2.19: `debug: var=x` registers x under its name and no msg; its line shows it."""
    path = roles("r", defaults="x: 1\n", tasks="""
        - {name: show, debug: {var: x}, register: d}
        - {assert: {that: "d.keys() | sort == ['changed', 'failed', 'x'] and d.x == 1"}}
        """)
    out = io.StringIO()
    recap = run_roles(shell, ["r"], path, reporter=TextReporter(out))
    assert recap.failed == 0, recap.failure
    assert "ok: [web1] => r : show: x: 1" in out.getvalue().splitlines()


def test_loop_wants_a_list_and_with_items_takes_anything_as_ansible(shell, roles):
    """As ansible-playbook 2.19: `loop` over a dict fails with Ansible's message (the result has no `changed`);
    `with_items` (the `items` lookup) takes a dict or a number as one item, and splices the lists in a list."""
    path = roles("r", defaults="d: {a: 1}\n", tasks="""
        - {debug: {msg: "{{ item }}"}, loop: "{{ d }}", ignore_errors: true, register: l}
        - {debug: {msg: "{{ item }}"}, with_items: "{{ d }}", register: w1}
        - {debug: {msg: "{{ item }}"}, with_items: 5, register: w2}
        - {debug: {msg: "{{ item }}"}, with_items: [[1, [2]], 3], register: w3}
        - assert:
            that:
              - l.msg == "The `loop` value must resolve to a 'list', not 'dict'." and 'changed' not in l
              - "w1.results | map(attribute='item') | list == [{'a': 1}]"
              - w2.results | map(attribute='item') | list == [5]
              - w3.results | map(attribute='item') | list == [1, [2], 3]
        """)
    recap, _ = play(shell, path)
    assert recap.failed == 0 and recap.ignored == 1, recap.failure


def test_skipping_the_always_tag_skips_the_plays_closing_flush_of_handlers(shell, roles, tmp_path):
    """As ansible-playbook 2.19, whose implicit flush_handlers is tagged `always`: with --skip-tags always a
    notified handler runs only where a meta: flush_handlers that runs flushes it."""
    log = tmp_path / "log"
    path = roles("r", tasks="""
        - {command: "true", notify: early}
        - {meta: flush_handlers, tags: t}
        - {command: "true", notify: late}
        """, handlers=f"""
        - {{name: early, shell: echo early >> {log}}}
        - {{name: late, shell: echo late >> {log}}}
        """)
    play(shell, path, skip_tags=["always"])
    assert log.read_text().split() == ["early"]
    log.unlink()
    play(shell, path, skip_tags=["t"])
    assert log.read_text().split() == ["early", "late"]
