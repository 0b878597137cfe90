"""Running a play (the roles of one host) the way ansible-playbook would, over one connection."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from machine.errors import MachineError
from machine.roles import facts as facts_mod
from machine.roles.loader import RoleRun, Task, as_list, handler_names, load_play, save_plays, shared_templar
from machine.roles.modules import SHOWN, Context, ModuleFailure
from machine.roles.remote import Become, Remote, Runner
from machine.roles.report import Failure, Recap, Reporter, SilentReporter, TaskInfo, TaskResult
from machine.roles.templating import OMIT, TemplateFailure, Vars, is_template, to_bool, type_name
from machine.roles.yamlload import RoleError
from machine.ssh import ConnectionLost

_HIDDEN = "the output has been hidden due to the fact that 'no_log: true' was specified for this result"
_CENSORED = "(censored due to no_log)"
_UNTAGGED = frozenset({"untagged"})
_ALWAYS = frozenset({"always"})
# A lost connection is re-opened and the interrupted task run again from its start (tasks are idempotent):
# a host that stays away this long is unreachable, and a task that loses it this often (one that reboots the
# host, say) fails instead of looping.
RECONNECT_TIMEOUT = 60.0
RECONNECTS_PER_TASK = 3


class _HostFailed(Exception):
    """A task failed the host: `name` is the task's own name (empty if it has none) and `result` its whole result,
    `ansible_failed_task.name` and `ansible_failed_result` in a rescue."""

    def __init__(self, failure: Failure, name: str, result: Mapping[str, Any] | None = None) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.name = name
        self.result = dict(result) if result is not None else {"failed": True, "msg": failure.msg}


class _Unreachable(Exception):
    pass


class _EndHost(Exception):
    pass


@dataclass(frozen=True)
class Scope:
    """Keywords a block or an import hands down to the tasks inside it.

    The flags (`become`, `ignore_errors`, `check_mode`, `diff`, `no_log`) are kept as written, since they may be
    templates (`no_log: "{{ hide }}"`): `resolved` works them out with the variables of the task they apply to,
    as Ansible does."""

    when: tuple[Any, ...] = ()
    tags: frozenset[str] = frozenset()
    vars: tuple[Mapping[str, Any], ...] = ()
    become: Any = False
    become_user: str = "root"
    ignore_errors: Any = False
    check_mode: Any = None
    diff: Any = None
    no_log: Any = False
    environment: Mapping[str, Any] = field(default_factory=dict)
    # The vars of the include_tasks the tasks came from: Ansible's "include params", above set_fact and role params.
    params: tuple[Mapping[str, Any], ...] = ()

    def inherit(self, task: Task, *, conditions: bool = True, tags: bool = True) -> Scope:
        d = task.data
        return replace(
            self,
            when=self.when + ((d["when"],) if conditions and "when" in d else ()),
            tags=self.tags | (frozenset(map(str, as_list(d.get("tags")))) if tags else frozenset()),
            vars=self.vars + ((d["vars"],) if "vars" in d else ()),
            become_user=str(d.get("become_user", self.become_user)),
            environment={**self.environment, **(d.get("environment") or {})},
            **{flag: d[flag] for flag in _FLAGS if flag in d},
        )

    def resolved(self, template: Callable[[Any], Any]) -> Scope:
        """The flags as booleans (None: the play's setting), templated by `template` first (TemplateFailure)."""
        return replace(self, **{flag: to_bool(template(value)) for flag in _FLAGS
                                if (value := getattr(self, flag)) is not None and not isinstance(value, bool)})


_FLAGS = ("become", "ignore_errors", "check_mode", "diff", "no_log")


def selected(tags: frozenset[str], only: frozenset[str], skip: frozenset[str]) -> bool:
    """Ansible's tag selection, including the special tags always, never, all, tagged and untagged."""
    tags = tags or _UNTAGGED
    run = True
    if only:
        run = ("always" in tags or ("all" in only and "never" not in tags) or not tags.isdisjoint(only)
               or ("tagged" in only and tags != _UNTAGGED and "never" not in tags))
    if run and skip:
        if "all" in skip:
            run = "always" in tags and "always" not in skip
        elif not tags.isdisjoint(skip) or ("tagged" in skip and tags != _UNTAGGED):
            run = False
    return run


def _own_name(task: Task) -> str:
    """The task's name as Ansible's ansible_failed_task has it: as written, without its role, empty if none."""
    return str(task.data.get("name") or "")


class Play:
    def __init__(self, remote: Remote, runs: Sequence[RoleRun], extra_vars: Mapping[str, Any], *, check: bool,
                 diff: bool, tags: Sequence[str] | None, skip_tags: Sequence[str] | None, become: bool,
                 reporter: Reporter, host: str) -> None:
        self.remote = remote
        self.runs = list(runs)
        self.extra_vars = dict(extra_vars)
        self.check, self.diff = check, diff
        self.only = frozenset(tags or ["all"])
        self.skip = frozenset(skip_tags or [])
        self.root = Scope(become=become)
        self.reporter = reporter
        self.host = host
        self.templar = shared_templar()
        self.recap = Recap(host)
        self.facts: dict[str, Any] = {}
        self.fact_vars: dict[str, Any] = {}
        self.host_vars: dict[str, Any] = {}  # set_fact and register: the highest layer below role params
        self.all_defaults: dict[str, Any] = {}
        self.all_role_vars: dict[str, Any] = {}
        for run in self.runs:
            self.all_defaults.update(run.role.defaults)
            self.all_role_vars.update(run.role.vars)
        self.handlers = handler_names(self.runs)
        self.handler_order = [(h, run) for run in self.runs for h in run.role.handlers]
        self.notified: set[int] = set()
        self.reconnects = 0

    # -- the play -------------------------------------------------------------------------------------
    def run(self) -> Recap:
        try:
            self._gather_facts()
            for run in self.runs:
                self._run_list(run.role.tasks, run, self.root)
            # As Ansible's play of roles: its implicit flushes, after its (roles' and own) tasks and its post_tasks,
            # which are tagged `always`: `--skip-tags always` leaves the handlers they would run unrun.
            if selected(_ALWAYS, self.only, self.skip):
                self._flush_handlers()
                self._flush_handlers()
        except _HostFailed as e:
            self.recap.failed += 1
            self.recap.failure = e.failure
        except _Unreachable as e:
            self.recap.unreachable += 1
            self.recap.failure = Failure("connection", self.host, str(e))
        except _EndHost:
            pass
        self.reporter.recap(self.recap)
        return self.recap

    def _gather_facts(self) -> None:
        info = TaskInfo("Gathering Facts", "", "setup")
        self.reporter.task_start(self.host, info)
        res = self._remote_call(lambda: self.remote.run(facts_mod.FACTS_SCRIPT))
        if res.rc != 0:
            raise _HostFailed(Failure(info.label, info.where, f"fact gathering failed: {res.stderr.strip()}"),
                              info.label)
        self.facts = facts_mod.parse_facts(res.stdout)
        self.fact_vars = facts_mod.as_variables(self.facts)
        self.recap.ok += 1
        self.reporter.task_result(self.host, info, TaskResult("ok"))

    def _remote_call(self, fn: Any) -> Any:
        """fn() (one task's remote work), run again from its start after each reconnect."""
        lost = 0
        while True:
            try:
                return fn()
            except RoleError:
                raise
            except ConnectionLost as e:
                lost += 1
                if lost > RECONNECTS_PER_TASK:
                    raise _Unreachable(f"{e}, {RECONNECTS_PER_TASK} times in one task") from None
                self._reconnect()
            except MachineError as e:
                raise _Unreachable(str(e)) from None

    def _reconnect(self) -> None:
        try:
            self.remote.reconnect(RECONNECT_TIMEOUT)
        except MachineError as e:
            raise _Unreachable(str(e)) from None
        self.reconnects += 1

    # -- variables --------------------------------------------------------------------------------------
    def variables(self, run: RoleRun, scope: Scope, task_vars: Mapping[str, Any] | None = None) -> Vars:
        magic = {
            "role_name": run.role.name, "role_path": str(run.role.path), "inventory_hostname": self.host,
            "inventory_hostname_short": self.host.split(".")[0], "ansible_check_mode": self.check,
            "ansible_diff_mode": self.diff, "ansible_managed": "Ansible managed", "omit": OMIT,
        }
        layers: list[tuple[Mapping[str, Any], bool]] = [
            (self.all_defaults, False), (run.role.defaults, False), (self.fact_vars, True),
            (self.all_role_vars, False), (run.role.vars, False), *((v, False) for v in scope.vars),
            (task_vars or {}, False), (self.host_vars, True), (run.params, False), *((v, False) for v in scope.params),
            (self.extra_vars, False),
            (magic, True),
        ]
        return Vars(self.templar, layers)

    # -- task lists, blocks -------------------------------------------------------------------------------
    def _run_list(self, tasks: Sequence[Task], run: RoleRun, scope: Scope, handler: bool = False) -> None:
        ahead = 0  # tasks after this one whose reads the last read-ahead made
        for index, task in enumerate(tasks):
            if ahead and self.remote.holds_reads():
                ahead -= 1  # read with the tasks before it, and no command ran since
            elif task.module is not None and task.module.reads and not self.diff:  # --diff reads files' text too
                ahead = self._read_ahead(tasks[index:], run, scope)
            self._run_task(task, run, scope, handler)

    # -- reading ahead ----------------------------------------------------------------------------------
    def _read_ahead(self, tasks: Sequence[Task], run: RoleRun, scope: Scope) -> int:
        """Read what this task and the tasks of the same kind right after it will look at first (files of file
        tasks, units of service tasks) with one command: a role's directory, configuration files and drop-ins,
        or its services, come in a row, and each task then finds what it reads known instead of asking for it,
        as long as no command runs in between. Only what can be worked out now is read; a task whose name or
        condition depends on what runs before it simply asks for itself. Returns how many of the tasks after
        the first it read for."""
        first = self._reads_of(tasks[0], run, scope)
        if first is None:
            return 0
        kind, names, become = first
        if names and self.remote.known(kind, names[0], become) is not None:  # read with the tasks before it
            return 0
        covered = 0
        for task in tasks[1:]:
            more = self._reads_of(task, run, scope)
            if more is None or (more[0], more[2]) != (kind, become):
                break
            names += more[1]
            covered += 1
        if len(names) < 2:
            return 0
        self._remote_call(lambda: self.remote.read_ahead(kind, names, become))
        return covered

    def _reads_of(self, task: Task, run: RoleRun, scope: Scope) -> tuple[str, list[str], Become] | None:
        """(kind, the names the task will read: one per loop item, as whom), or None when that is not plain now."""
        module = task.module
        tags = scope.tags | frozenset(map(str, as_list(task.get("tags"))))
        if (module is None or module.reads is None or "until" in task.data or "retries" in task.data
                or "with_items" in task.data
                or "index_var" in (task.get("loop_control") or {}) or not selected(tags, self.only, self.skip)):
            return None
        variables = self.variables(run, scope, task.get("vars"))
        loop_var = (task.get("loop_control") or {}).get("loop_var", "item")
        try:  # an optimisation: whatever cannot be worked out now is left to the task itself
            own = self._own(task, scope, variables)
            items = self._items(task, variables) if "loop" in task.data else [None]
            names = []
            for item in items:
                ivars = variables if "loop" not in task.data else variables.child(
                    {loop_var: item, "ansible_loop_var": loop_var})
                if not all(self.templar.condition(c, ivars) for c in (*scope.when, *as_list(task.get("when")))):
                    return None
                name = module.reading(self.templar.template(task.args, ivars))
                if name is None:
                    return None
                names.append(name)
            return module.reads[0], names, Become(own.become, str(self.templar.template(own.become_user, variables)))
        except (TemplateFailure, RoleError):
            return None

    def _run_task(self, task: Task, run: RoleRun, scope: Scope, handler: bool = False) -> None:
        if task.action == "block":
            self._run_block(task, run, scope.inherit(task), handler)
        elif task.action == "import_tasks":
            self._run_list(task.tasks or [], run, scope.inherit(task), handler)
        elif not handler and not selected(scope.tags | frozenset(map(str, as_list(task.get("tags")))), self.only,
                                          self.skip):
            return  # a meta task too, as in Ansible (only its implicit flush_handlers escapes tags)
        elif task.action == "meta":
            self._meta(task, run, scope)
        else:
            self._run_action(task, run, scope, handler)

    def _run_block(self, block: Task, run: RoleRun, scope: Scope, handler: bool) -> None:
        failure: _HostFailed | None = None
        try:
            self._run_list(block.block, run, scope, handler)
        except _HostFailed as e:
            failure = e
            if block.rescue:
                failure = None
                self.recap.rescued += 1
                self.host_vars["ansible_failed_task"] = {"name": e.name, "where": e.failure.where}
                self.host_vars["ansible_failed_result"] = e.result
                try:
                    self._run_list(block.rescue, run, scope, handler)
                except _HostFailed as e2:
                    failure = e2
        self._run_list(block.always, run, scope, handler)
        if failure is not None:
            raise failure

    def _meta(self, task: Task, run: RoleRun, scope: Scope) -> None:
        scope = scope.inherit(task)
        try:
            if not self._condition(scope.when, self.variables(run, scope)):
                return
        except TemplateFailure as e:
            raise self._fail(task, self._info(task, run, False), str(e)) from None
        if task.args == "flush_handlers":
            self._flush_handlers()
        elif task.args in ("end_host", "end_play"):
            raise _EndHost()

    def _flush_handlers(self) -> None:
        """One pass over the handlers in definition order, as Ansible's: a handler that one of them notifies runs
        in this pass if it comes later, or else waits for the next flush."""
        for handler, run in self.handler_order:
            if id(handler) in self.notified:
                self.notified.discard(id(handler))
                self._run_task(handler, run, self.root, handler=True)

    # -- one task ----------------------------------------------------------------------------------------
    def _info(self, task: Task, run: RoleRun, handler: bool) -> TaskInfo:
        return TaskInfo(f"{run.role.name} : {task.name}", task.where, task.action, handler)

    def _fail(self, task: Task, info: TaskInfo, msg: str) -> _HostFailed:
        self.reporter.task_result(self.host, info, TaskResult("failed", msg=msg))
        return _HostFailed(Failure(info.label, info.where, msg), _own_name(task))

    def _condition(self, conditions: Sequence[Any], variables: Vars) -> bool:
        """Whether all `conditions` hold; TemplateFailure, worded as Ansible's, when one cannot be evaluated."""
        try:
            return all(self.templar.condition(c, variables) for c in conditions)
        except TemplateFailure as e:
            raise TemplateFailure(f"Error while evaluating conditional: {e}") from None

    def _skip(self, conditions: Sequence[Any], variables: Vars) -> dict[str, Any] | None:
        """The skipped result when one of `conditions` (a list among them counting item by item) does not hold,
        naming the first that does not as Ansible's `false_condition` (as written, or a template's value); None
        when all hold. TemplateFailure as _condition's."""
        for condition in (c for each in conditions for c in (each if isinstance(each, list) else [each])):
            if not self._condition([condition], variables):
                if isinstance(condition, str) and is_template(condition):
                    condition = self.templar.template(condition, variables)
                return {"changed": False, "false_condition": condition, "skip_reason": "Conditional result was False",
                        "skipped": True}
        return None

    def _run_action(self, task: Task, run: RoleRun, scope: Scope, handler: bool) -> None:
        info = self._info(task, run, handler)
        variables = self.variables(run, scope, task.get("vars"))
        self.reporter.task_start(self.host, info)
        try:
            own = self._own(task, scope, variables)
        except TemplateFailure as e:  # whether its errors are ignored is itself unknown: the task fails the host
            raise self._fail(task, info, str(e)) from None
        looped = "loop" in task.data or "with_items" in task.data
        try:
            items = self._items(task, variables) if looped else None
        except TemplateFailure as e:  # as Ansible: the task fails, and ignore_errors and register still apply
            failed = {"failed": True, "msg": str(e)}
            self._report(info, failed, own, None)
            self._account(task, run, info, own, failed)
            return
        control = task.get("loop_control") or {}
        loop_var = control.get("loop_var", "item")
        results: list[dict[str, Any]] = []
        for index, item in enumerate(items if items is not None else [None]):
            ivars, label = variables, None
            if items is not None:
                top = {loop_var: item, "ansible_loop_var": loop_var}
                if control.get("index_var"):
                    top.update({control["index_var"]: index, "ansible_index_var": control["index_var"]})
                ivars = variables.child(top)
                label = str(self._safe(control["label"], ivars) if "label" in control else item)
            result = self._item(task, run, scope, own, ivars, handler)
            shown = result.pop(SHOWN, None)
            if items is not None:  # as Ansible, the item's result carries the loop variables (`item` is one)
                result = {**result, **top}
            results.append(result)
            if "include" not in result:  # an included file is reported as it runs
                self._report(info, result, own, label, shown)
        if items is None:
            final = results[0]
        elif not items:  # as Ansible: an empty loop skips the task
            final = {"changed": False, "skipped": True, "skipped_reason": "No items in the list", "results": []}
            self._report(info, final, own, None)
        else:
            skipped = all(r.get("skipped") for r in results)
            final = {"results": results, "changed": any(r.get("changed") for r in results), "skipped": skipped,
                     "msg": "All items skipped" if skipped else "All items completed"}
            if any(r.get("failed") for r in results):
                final.update(failed=True, msg="One or more items failed")
        self._account(task, run, info, own, final)
        if task.action == "include_tasks":
            self._include_files(task, run, scope, final, handler)

    def _item(self, task: Task, run: RoleRun, scope: Scope, own: Scope, variables: Vars,
              handler: bool) -> dict[str, Any]:
        """The task's result for one loop item (or the one run of a task without a loop). As in Ansible, a
        condition or template that cannot be evaluated fails it, the failure then ignored or registered as any."""
        try:
            skipped = self._skip((*scope.when, *as_list(task.get("when"))), variables)
            if skipped is not None:
                return skipped
            if task.action != "include_tasks":
                return self._execute(task, run, own, variables)
            return {"changed": False, "include": str(self.templar.template(task.args, variables))}
        except TemplateFailure as e:
            return {"changed": False, "failed": True, "msg": str(e)}

    def _own(self, task: Task, scope: Scope, variables: Vars) -> Scope:
        """The keywords `task` runs with: its own over its blocks', templated with its variables."""
        return scope.inherit(task, conditions=False, tags=False).resolved(
            lambda value: self.templar.template(value, variables))

    def _items(self, task: Task, variables: Vars) -> list[Any]:
        if "loop" in task.data:
            items = self.templar.template(task.get("loop"), variables)
            if not isinstance(items, list):
                raise TemplateFailure(f"The `loop` value must resolve to a 'list', not {type_name(items)!r}.")
            return items
        # As Ansible's `items` lookup: anything but a list is one item, and the lists in a list are spliced.
        items = self.templar.template(task.get("with_items"), variables)
        return [x for i in (items if isinstance(items, list) else [items]) for x in (i if isinstance(i, list) else [i])]

    def _safe(self, value: Any, variables: Vars) -> Any:
        try:
            return self.templar.template(value, variables)
        except TemplateFailure:
            return value

    def _report(self, info: TaskInfo, result: Mapping[str, Any], scope: Scope, item: str | None,
                shown: str | None = None) -> None:
        """Report `result`; `shown` is what the task's line shows of a result that did not fail, if anything."""
        status = ("failed" if result.get("failed") else "skipped" if result.get("skipped")
                  else "changed" if result.get("changed") else "ok")
        msg = str(result.get("msg", "")) if shown is None or result.get("failed") else shown
        diff = str(result.get("diff", ""))
        if scope.no_log:  # a loop item's label may be the secret itself
            msg, diff, item = (_HIDDEN if msg else ""), "", (_CENSORED if item is not None else None)
        self.reporter.task_result(self.host, info, TaskResult(
            status, msg=msg, diff=diff, item=item, ignored=status == "failed" and scope.ignore_errors,
            result=dict(result) if not scope.no_log else {}, shown=shown is not None))

    def _account(self, task: Task, run: RoleRun, info: TaskInfo, scope: Scope, result: dict[str, Any]) -> None:
        """Register, count, notify, and stop the host on an unignored failure, as Ansible's strategy does: an
        ignored failure counts as ok and ignored (and changed, if it changed) but notifies nothing, and an
        include counts nothing itself (each file it includes counts as ok)."""
        if task.get("register"):
            self.host_vars[task.get("register")] = result
        if result.get("failed"):
            if not scope.ignore_errors:
                # The result is given whole to a rescue, even under no_log, as Ansible does (as `register` does).
                raise _HostFailed(Failure(info.label, info.where,
                                          _HIDDEN if scope.no_log else self._failure_msg(result)),
                                  _own_name(task), result)
            self.recap.ignored += 1
        elif result.get("skipped"):
            self.recap.skipped += 1
            return
        elif task.action == "include_tasks":
            return
        self.recap.ok += 1
        if result.get("changed"):
            self.recap.changed += 1
            if not result.get("failed"):
                self._notify(task, run, scope)

    @staticmethod
    def _failure_msg(result: Mapping[str, Any]) -> str:
        if "results" in result:
            failed = [r for r in result["results"] if r.get("failed")]
            return "; ".join(f"item={r.get(r.get('ansible_loop_var', 'item'))!r}: {Play._failure_msg(r)}"
                             for r in failed)
        when_error = result.get("changed_when_result", result.get("failed_when_result"))
        if isinstance(when_error, str):  # the condition could not be evaluated: the module's msg says nothing of it
            return when_error
        msg = str(result.get("msg") or "failed")
        detail = str(result.get("stderr") or "").strip().splitlines()
        # A module's own message may already end with the command's last error line: say it once.
        if "rc" not in result or not detail or detail[-1] in msg:
            return msg
        return f"{msg} (rc={result['rc']}): {detail[-1]}"

    def _notify(self, task: Task, run: RoleRun, scope: Scope) -> None:
        variables = self.variables(run, scope, task.get("vars"))
        for target in as_list(task.get("notify")):
            name = str(self.templar.template(target, variables))
            found = self.handlers.get(name) or self.handlers.get(f"{run.role.name} : {name}")
            if not found:
                raise _HostFailed(Failure(f"{run.role.name} : {task.name}", task.data.where("notify"),
                                          f"no handler named '{name}'"), _own_name(task))
            self.notified.update(id(h) for h in found)

    # -- executing a module -----------------------------------------------------------------------------
    def _execute(self, task: Task, run: RoleRun, scope: Scope, variables: Vars) -> dict[str, Any]:
        assert task.module is not None
        args = {k: v for k, v in self.templar.template(task.args, variables).items() if v != OMIT}
        env = {k: v for k, v in self.templar.template(dict(scope.environment), variables).items() if v != OMIT}
        ctx = Context(remote=self.remote, templar=self.templar, vars=variables, facts=self.facts,
                      search_paths=run.role.search_paths,
                      become=Become(scope.become, str(self.templar.template(scope.become_user, variables))),
                      env=env, check=self.check if scope.check_mode is None else scope.check_mode,
                      diff=self.diff if scope.diff is None else scope.diff)
        register = task.get("register")
        attempts = self._attempts(task, variables)
        delay = max(0.0, float(self.templar.template(task.get("delay", 5), variables)))
        for attempt in range(1, attempts + 1):
            result = {"failed": False, "changed": False, **self._call_module(task, ctx, args)}  # as Ansible, both set
            if attempts > 1:
                result["attempts"] = attempt
            rvars = variables.child({register: result}) if register else variables
            if "skipped" not in result:  # as Ansible: a skipped result (check mode, say) is not judged
                self._judge(task, result, rvars)
            if attempts == 1 or self._condition(as_list(task.get("until")) or [not result.get("failed")], rvars):
                break
            if attempt < attempts:
                time.sleep(delay)
        else:  # as Ansible: failed, the module's msg kept, and `attempts` one short of the runs made
            result.update(failed=True, attempts=attempts - 1)
        if "ansible_facts" in result and not result.get("failed"):
            self.host_vars.update(result["ansible_facts"])
        return result

    def _attempts(self, task: Task, variables: Vars) -> int:
        """How many times the task may run, as in Ansible: once and `retries` more, with or without `until`
        (which defaults to the task not failing); `until` alone allows 3 retries."""
        if "retries" in task.data:
            return 1 + max(0, int(self.templar.template(task.get("retries"), variables)))
        return 4 if "until" in task.data else 1

    def _judge(self, task: Task, result: dict[str, Any], variables: Vars) -> None:
        """Apply the task's changed_when and failed_when to its module's result (the module's msg stays)."""
        for keyword in ("changed_when", "failed_when"):
            if keyword not in task.data:
                continue
            try:
                holds = self._condition([task.get(keyword)], variables)
            except TemplateFailure as e:  # as Ansible: the task fails, the error kept in the result
                result.update({"failed": True, f"{keyword}_result": str(e)})
                return
            if keyword == "changed_when":
                result["changed"] = holds
            else:
                result["failed_when_result"] = result["failed"] = holds

    def _call_module(self, task: Task, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        assert task.module is not None
        reconnects = self.reconnects
        try:
            result = self._remote_call(lambda: task.module(ctx, args).run())  # type: ignore[misc]
            if self.reconnects != reconnects and not ctx.check and not result.get("failed"):
                # The interrupted run may have made the change the re-run then found done: count it, so that
                # the handlers it notifies still run.
                result["changed"] = True
            return result
        except ModuleFailure as e:
            return {"changed": False, "failed": True, "msg": e.msg, **e.extra}
        except TemplateFailure:
            raise
        except RoleError as e:
            return {"changed": False, "failed": True, "msg": str(e)}
        except (ValueError, IndexError, KeyError, TypeError) as e:
            # Output a probe did not expect (an unusual target): fail this task, not the whole program.
            return {"changed": False, "failed": True, "msg": f"{task.action}: {type(e).__name__}: {e}"}

    def _include_files(self, task: Task, run: RoleRun, scope: Scope, result: Mapping[str, Any],
                       handler: bool) -> None:
        """Once the include's result is in, run the file of each item that was neither skipped nor failed, in
        order, as Ansible's strategy does."""
        for one in result.get("results", [result]):
            if "include" in one:
                self._include(task, run, scope, one, handler)

    def _include(self, task: Task, run: RoleRun, scope: Scope, result: Mapping[str, Any], handler: bool) -> None:
        """Run the tasks of the file an include's `result` names in `scope`, the scope the include itself is in.

        As in Ansible, the include's own keywords (when, tags, ignore_errors, no_log) apply to the include alone,
        while those of the blocks around it apply to each included task: a block's `when` is checked again for
        every one of them. The include's vars and loop variable reach them, the vars above set_fact."""
        info, name = self._info(task, run, handler), result["include"]
        try:
            tasks = task.tasks if task.tasks is not None and name == task.args else run.role.task_file(name)
        except RoleError as e:  # as Ansible: a file that cannot be included fails the host, ignore_errors or not
            raise self._fail(task, info, str(e)) from None
        self.recap.ok += 1
        self.reporter.task_result(self.host, info, TaskResult("included", msg=name))
        # As Ansible's IncludedFile: the loop variables of the item reach the included tasks.
        carried = {key: result[key] for name in ("ansible_loop_var", "ansible_index_var") if name in result
                   for key in (name, result[name])}
        self._run_list(tasks, run, replace(scope, vars=(*scope.vars, carried),
                                           params=(*scope.params, task.get("vars") or {})), handler)


def run_roles(conn: Runner, roles: Sequence[str], roles_path: Path | Sequence[Path],
              extra_vars: Mapping[str, Any] | None = None, *, check: bool = False, diff: bool = False,
              tags: Sequence[str] | None = None, skip_tags: Sequence[str] | None = None, become: bool = False,
              reporter: Reporter | None = None, host_name: str = "web1",
              more: Sequence[tuple[Sequence[str], Path | Sequence[Path]]] = ()) -> Recap:
    """Validate `roles` (raising RoleError before anything runs), then run them on `conn`'s host.

    `more` adds (roles, roles path) pairs to the same play, after `roles`: roles of another path (a fleet's own)
    run with one connection, one fact gathering and one recap, and each name is still looked up in its own path
    (a fleet's role named like one of the engine's does not replace it). A role that already ran with the same
    parameters runs once, as in Ansible.

    The returned Recap has Ansible's counters; `recap.failure` names the failed task, its file:line and the
    module's message. Extra vars have the highest precedence, as in Ansible.
    """
    runs = list(load_play(roles, roles_path))
    for names, path in more:
        runs += [run for run in load_play(names, path)
                 if not any(r.role.path == run.role.path and r.params == run.params for r in runs)]
    play = Play(Remote(conn), runs, extra_vars or {}, check=check, diff=diff, tags=tags, skip_tags=skip_tags,
                become=become, reporter=reporter or SilentReporter(), host=host_name)
    try:
        return play.run()
    finally:
        play.templar.code.save()  # what only running compiled (templated defaults, say), if the code is kept
        save_plays()
