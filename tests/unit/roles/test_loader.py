"""Loading roles: file:line for every refusal, before anything runs."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading

import pytest

from machine.roles import RoleError, load_role, loader, run_roles, validate
from machine.roles.loader import handler_names, load_play
from machine.roles.modules import MODULES


def refused(roles_path, name="r") -> str:
    with pytest.raises(RoleError) as e:
        validate([name], roles_path)
    return str(e.value)


def test_lines_of_tasks_and_keys(roles):
    path = roles("r", tasks="""
        ---
        - name: first
          debug: msg=hi

        - name: second
          command: echo hi
          register: out
        """)
    role = load_role("r", path)
    assert [t.where for t in role.tasks] == ["roles/r/tasks/main.yml:2", "roles/r/tasks/main.yml:5"]
    assert role.tasks[1].data.where("register") == "roles/r/tasks/main.yml:7"
    assert role.tasks[0].args == {"msg": "hi"}
    assert role.tasks[1].args == {"_raw_params": "echo hi"}


@pytest.mark.parametrize(("tasks", "message"), [
    ("- name: a\n  debug: {}\n- name: b\n  frobnicate: {x: 1}\n",
     "roles/r/tasks/main.yml:4: unknown module 'frobnicate'"),
    ("- name: a\n  debug: {}\n  whne: true\n", "roles/r/tasks/main.yml:3: unknown keyword 'whne'"),
    ("- copy: {dest: /x, content: y, colour: red}\n", "roles/r/tasks/main.yml:1: unsupported argument 'colour' for "
                                                      "module 'copy'"),
    ("- template: {dest: /x}\n", "roles/r/tasks/main.yml:1: missing required argument 'src' for module 'template'"),
    ("- file: {path: /x, state: gone}\n", "roles/r/tasks/main.yml:1: argument 'state' of module 'file' must be one"),
    ("- name: a\n  command: \"true\"\n  notify: nobody\n", "roles/r/tasks/main.yml:3: no handler named 'nobody'"),
    ("- debug: {}\n  copy: {dest: /x, content: y}\n", "conflicting actions in one task: debug, copy"),
    ("- name: only keywords\n  when: true\n", "roles/r/tasks/main.yml:1: task has no module"),
    ("- block:\n    - debug: {}\n  loop: [1]\n", "roles/r/tasks/main.yml:3: unknown keyword 'loop' on a block"),
    ("- block:\n    - debug: {}\n    - bogus: 1\n", "roles/r/tasks/main.yml:3: unknown module 'bogus'"),
    ("- import_tasks: missing.yml\n", "roles/r/tasks/main.yml:1: roles/r/tasks/missing.yml: no such task file"),
    ("- meta: refresh_inventory\n", "unsupported meta action 'refresh_inventory'"),
    ("- debug: {}\n  loop_control: {pause: 1}\n", "unsupported loop_control option 'pause'"),
    ("- name: x\n  debug: {msg: [unclosed\n", "roles/r/tasks/main.yml:3: YAML syntax error"),
    ("- apt: name=tree state=present cache=yes\n", "unsupported argument 'cache' for module 'apt'"),
    # Ansible's but outside the subset: refused before anything runs, not undefined when reached.
    ("- command: echo first\n- debug: {msg: \"{{ lookup('env', 'HOME') }}\"}\n",
     "roles/r/tasks/main.yml:2: lookup() is outside the Ansible subset pymachine runs"),
    ("- debug: {}\n  when: hostvars['h'].x is defined\n", "roles/r/tasks/main.yml:2: hostvars is outside the Ansible"),
    ("- debug: {msg: '{{ item }}'}\n  loop: \"{{ query('inventory_hostnames', 'all') }}\"\n",
     "roles/r/tasks/main.yml:2: query() is outside"),
    # As Ansible 2.19 refuses them when it loads the play (its words).
    ("- debug: {}\n  register: 'True'\n", "roles/r/tasks/main.yml:2: Invalid 'register' specified: Invalid variable "
                                          "name 'True'."),
    ("- block:\n    - debug: {}\n  vars: {a-b: 1}\n", "roles/r/tasks/main.yml:3: Invalid variable name 'a-b'."),
    # A symbolic mode would fail only when the task is reached, after the tasks before it changed the host.
    ("- debug: {}\n- file: {path: /x, mode: 'u=rw,g=r'}\n", "roles/r/tasks/main.yml:2: mode 'u=rw,g=r': only octal "
                                                          "modes (e.g. '0644') are supported (module 'file')"),
    ("- copy: dest=/x content=y mode=a+x\n", "roles/r/tasks/main.yml:1: mode 'a+x': only octal modes"),
    # Ansible (2.19) refuses these on include_tasks; they must not silently reach the included tasks instead.
    *((f"- name: inc\n  include_tasks: '{{{{ f }}}}'\n  {key}: {value}\n",
       f"roles/r/tasks/main.yml:3: '{key}' cannot be used with include_tasks")
      for key, value in (("check_mode", "true"), ("environment", "{A: b}"), ("become", "true"),
                         ("become_user", "x"), ("diff", "true"), ("notify", "h"), ("args", "{}"),
                         ("changed_when", "false"), ("failed_when", "false"), ("until", "true"))),
])
def test_refusals_name_file_and_line(roles, tasks, message):
    path = roles("r", tasks=tasks)
    assert message in refused(path)


def test_a_template_file_using_lookup_is_refused_naming_its_line(roles):
    """As a task's arguments are: before anything runs, naming the template file and the line."""
    path = roles("r", tasks="- debug: {}\n- template: {src: t.j2, dest: /tmp/x}\n", files={
        "templates/t.j2": "a\n{% if x %}\nhome={{ lookup('env', 'HOME') }}\n{% endif %}\n"})
    assert refused(path) == ("roles/r/templates/t.j2:3: lookup() is outside the Ansible subset pymachine runs "
                             "(docs/ansible-subset.md)")
    path = roles("r", files={"templates/t.j2": "{% for h in groups['all'] %}{{ h }}{% endfor %}\n"})
    assert refused(path).startswith("roles/r/templates/t.j2:1: groups is outside the Ansible subset")


def test_unknown_module_in_an_imported_file(roles):
    path = roles("r", tasks="- import_tasks: more.yml\n", files={"tasks/more.yml": "- debug: {}\n- nope: {}\n"})
    assert refused(path) == "roles/r/tasks/main.yml:1: roles/r/tasks/more.yml:2: unknown module 'nope'"


def test_fully_qualified_names_resolve_to_the_modules(roles):
    path = roles("r", tasks="""
        - ansible.builtin.command: "true"
        - ansible.posix.sysctl: {name: net.ipv4.ip_forward, value: 1}
        - community.general.modprobe: {name: overlay}
        """)
    tasks = load_role("r", path).tasks
    assert [t.module for t in tasks] == [MODULES["command"], MODULES["sysctl"], MODULES["modprobe"]]
    assert [t.args for t in tasks] == [{"_raw_params": "true"}, {"name": "net.ipv4.ip_forward", "value": 1},
                                       {"name": "overlay"}]


LISTENING = """
    - name: restart a
      ansible.builtin.shell: echo a >> {log}
      listen: restart things
    - name: restart b
      shell: echo b >> {log}
      listen: [other topic, restart things]
    - name: bystander
      shell: echo bystander >> {log}
    """


def test_handlers_are_found_by_name_and_by_listen_topic(roles, tmp_path):
    path = roles("r", tasks='- command: "true"\n  notify: restart things\n',
                 handlers=LISTENING.format(log=tmp_path / "log"))
    names = {key: [h.name for h in handlers] for key, handlers in handler_names(load_play(["r"], path)).items()}
    assert names == {
        "restart a": ["restart a"], "r : restart a": ["restart a"],
        "restart b": ["restart b"], "r : restart b": ["restart b"],
        "bystander": ["bystander"], "r : bystander": ["bystander"],
        "restart things": ["restart a", "restart b"], "other topic": ["restart b"],
    }


def test_notifying_a_listen_topic_runs_every_handler_listening_once(shell, roles, tmp_path):
    log = tmp_path / "log"
    path = roles("r", tasks="""
        - name: change
          ansible.builtin.command: "true"
          notify: restart things
        - name: change again
          command: "true"
          notify: [other topic]
        """, handlers=LISTENING.format(log=log))
    recap = run_roles(shell, ["r"], path)
    assert (recap.failed, recap.changed) == (0, 4), recap.failure
    assert log.read_text().split() == ["a", "b"]


def test_of_handlers_with_the_same_name_only_the_one_ansible_finds_first_runs(shell, roles, tmp_path):
    # Ansible searches the last role loaded first, and each role's handlers from the first (checked against
    # ansible-core 2.19): the dependency's `restart` loses to its dependent's, and within a role the first wins.
    log = tmp_path / "log"
    roles("base", handlers=f"""
        - name: restart
          shell: echo base >> {log}
        """)
    path = roles("r", meta="dependencies: [base]\n", tasks="""
        - command: "true"
          notify: [restart, topic, "base : restart"]
        """, handlers=f"""
        - name: restart
          shell: echo first >> {log}
        - name: restart
          shell: echo second >> {log}
        - name: listener
          shell: echo listener-1 >> {log}
          listen: topic
        - name: listener
          shell: echo listener-2 >> {log}
          listen: topic
        - name: other listener
          shell: echo other >> {log}
          listen: topic
        """)
    recap = run_roles(shell, ["r"], path)
    assert recap.failed == 0, recap.failure
    assert log.read_text().split() == ["base", "first", "listener-1", "other"]


def test_dependencies_run_first_and_once(roles):
    roles("base", tasks="- debug: msg=base\n")
    roles("mid", tasks="- debug: msg=mid\n", meta="dependencies: [base]\n")
    path = roles("top", tasks="- debug: msg=top\n", meta="dependencies:\n  - role: base\n  - mid\n")
    assert [r.role.name for r in load_play(["top", "mid"], path)] == ["base", "mid", "top"]


def test_dependency_cycle_and_missing_role(roles):
    roles("a", meta="dependencies: [b]\n")
    path = roles("b", meta="dependencies: [a]\n")
    assert "roles/b/meta/main.yml:1: role dependency cycle: a -> b -> a" in refused(path, "a")
    assert "role 'zzz' not found" in refused(path, "zzz")
    path = roles("c", meta="dependencies:\n  - role: missing\n")
    assert refused(path, "c").startswith("roles/c/meta/main.yml:2: role 'missing' not found")


def test_args_keyword_adds_options_to_a_free_form_module(roles):
    path = roles("r", tasks="- command: make install\n  args:\n    chdir: /src\n    creates: /usr/bin/x\n")
    task = load_role("r", path).tasks[0]
    assert task.args == {"_raw_params": "make install", "chdir": "/src", "creates": "/usr/bin/x"}


_NEXT_PROCESS = """
import json, sys
from pathlib import Path
from machine.roles import loader
loader.keep_plays(Path(sys.argv[1]))
play = loader.load_play(["r"], sys.argv[2])
loader.save_plays()
print(json.dumps([[t.name for t in play[0].role.tasks], "yaml" in sys.modules]))
"""


def next_process(kept, path) -> tuple[list[str], bool]:
    """What a new process loads with `kept` as its kept plays: (task names, whether it parsed YAML)."""
    out = subprocess.run([sys.executable, "-c", _NEXT_PROCESS, str(kept), str(path)], capture_output=True,
                         text=True, check=True).stdout
    return tuple(json.loads(out))


def test_a_loaded_play_is_kept_for_the_next_process_until_a_role_file_changes(roles, tmp_path):
    path = roles("r", tasks="- name: first\n  debug: {}\n")
    kept = tmp_path / "cache" / "plays"
    assert next_process(kept, path) == (["first"], True)
    assert kept.stat().st_mode & 0o777 == 0o600
    assert next_process(kept, path) == (["first"], False)  # read back: no YAML parsed, not even imported

    (path / "r/tasks/main.yml").write_text("- name: second\n  debug: {}\n")
    assert next_process(kept, path) == (["second"], True)
    assert next_process(kept, path) == (["second"], False)

    kept.chmod(0o666)  # someone else could have written it: unpickling it would run their code
    assert next_process(kept, path) == (["second"], True)
    kept.write_bytes(b"damaged")
    assert next_process(kept, path) == (["second"], True)


def test_a_refused_command_keeps_nothing(roles, tmp_path):
    path = roles("r", tasks="- name: first\n  debug: {}\n")
    loader.keep_plays(tmp_path / "plays")
    try:
        load_play(["r"], path)  # loaded (checked), but no run followed: save_plays() was not called
        assert not (tmp_path / "plays").exists()
    finally:
        loader.keep_plays(None)
        loader._unsaved.clear()


def test_a_task_file_first_included_while_the_plays_are_pickled_waits(roles):
    """A fleet's machines run one play in threads: one run ends and pickles the plays (save_plays, under the
    loading lock) while another includes a task file for the first time. The include waits: a role that changed
    under pickle would fail the run that was saving it."""
    path = roles("r", tasks="- debug: {msg: main}\n", files={"tasks/later.yml": "- debug: {msg: later}\n"})
    role = load_play(["r"], path)[0].role
    included = threading.Event()
    with loader._LOADING:
        thread = threading.Thread(target=lambda: (role.task_file("later.yml"), included.set()))
        thread.start()
        assert not included.wait(0.2)
    assert included.wait(5)
    thread.join()


def test_a_process_reads_the_roles_once_and_runs_what_it_validated(roles):
    path = roles("r", tasks="- name: first\n  debug: {}\n")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # a fleet's machines, at once
        plays = list(pool.map(lambda _: load_play(["r"], path), range(8)))
    assert all(play is plays[0] for play in plays)
    (path / "r/tasks/main.yml").write_text("- name: second\n  debug: {}\n")
    assert [t.name for t in load_play(["r"], path)[0].role.tasks] == ["first"]
