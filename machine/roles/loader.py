"""Loading and validating roles laid out as Ansible lays them out, before anything runs.

Every unknown keyword, module or module argument is refused here with the file and line it was written at.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from machine.roles.modules import MODULES, Module
from machine.roles.modules.base import split_kv
from machine.roles.templating import Templar, invalid_name, is_template
from machine.roles.yamlload import LineDict, RoleError, load_yaml

# Keywords a task may carry (besides its module), and those a block may carry.
TASK_KEYWORDS = frozenset({
    "name", "when", "loop", "with_items", "loop_control", "register", "notify", "become", "become_user",
    "changed_when", "failed_when", "ignore_errors", "tags", "vars", "check_mode", "no_log", "diff",
    "environment", "until", "retries", "delay", "args",
})
BLOCK_KEYWORDS = frozenset({
    "block", "rescue", "always", "name", "when", "tags", "become", "become_user", "vars", "ignore_errors",
    "check_mode", "no_log", "diff", "environment",
})
HANDLER_KEYWORDS = TASK_KEYWORDS | {"listen"}
LOOP_CONTROL = frozenset({"loop_var", "index_var", "label"})
INCLUDE = {"include_tasks": "include_tasks", "ansible.builtin.include_tasks": "include_tasks",
           "import_tasks": "import_tasks", "ansible.builtin.import_tasks": "import_tasks"}
META = ("meta", "ansible.builtin.meta")
META_ACTIONS = frozenset({"flush_handlers", "noop", "end_host", "end_play"})
# Modules whose literal `src` is a file of the role, and the role directory Ansible searches for it first.
_SOURCES = {"template": "templates", "copy": "files"}
# Keywords whose values are templated when the task runs, and whether each is a condition (a bare expression).
_TEMPLATED = (("when", True), ("changed_when", True), ("failed_when", True), ("until", True),
              ("loop", False), ("with_items", False))
# import_tasks is resolved at load time, so per-run keywords make no sense on it (Ansible refuses them too).
_STATIC_FORBIDDEN = frozenset({"loop", "with_items", "loop_control", "register", "notify", "until"})
# The keywords Ansible (2.19, TaskInclude.VALID_INCLUDE_KEYWORDS) accepts on include_tasks, besides `listen` in
# handlers; they apply to the include itself, never to the included tasks. `args` (Ansible's other way to give the
# file) is not supported.
_INCLUDE_KEYWORDS = frozenset({"name", "when", "loop", "with_items", "loop_control", "register", "tags", "vars",
                               "ignore_errors", "no_log", "listen"})


@dataclass
class Task:
    """One entry of a task list: a module call, a block, an include/import or a meta action."""

    data: LineDict
    action: str  # module name as written, or "block", "include_tasks", "import_tasks", "meta"
    args: Any
    role: Role
    module: type[Module] | None = None
    block: list[Task] = field(default_factory=list)
    rescue: list[Task] = field(default_factory=list)
    always: list[Task] = field(default_factory=list)
    tasks: list[Task] | None = None  # import_tasks (and literal include_tasks) resolved at load time

    @property
    def where(self) -> str:
        return self.data.where()

    @property
    def name(self) -> str:
        return str(self.data.get("name") or self.action)

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


@dataclass
class Role:
    name: str
    path: Path
    display: str  # e.g. "roles/kernel", for messages
    defaults: dict[str, Any] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)
    tasks: list[Task] = field(default_factory=list)
    handlers: list[Task] = field(default_factory=list)
    dependencies: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)  # (name, params, where)
    _files: dict[Path, list[Task]] = field(default_factory=dict, repr=False)
    # Where Ansible looks for a template (`templates`) or copy (`files`) `src` of this role's tasks. Set here, not
    # on first use: a fleet's threads run one Role at once, and one of them may be pickling it (save_plays).
    search_paths: dict[str, list[Path]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.search_paths = {kind: [self.path / kind, self.path / "tasks", self.path] for kind in _SOURCES.values()}

    def find_source(self, kind: str, name: str) -> Path | None:
        """The file a template/copy `src` names: absolute, or the first match in search_paths[kind]."""
        path = Path(name)
        candidates = [path] if path.is_absolute() else [d / path for d in self.search_paths[kind]]
        return next((c for c in candidates if c.is_file()), None)

    def task_file(self, name: str, stack: tuple[Path, ...] = ()) -> list[Task]:
        """Tasks of `name`, relative to the role's tasks/ directory (loaded and validated once)."""
        path = (self.path / "tasks" / name).resolve()
        if not path.is_file():
            raise RoleError(f"{self.display}/tasks/{name}: no such task file")
        if path in stack:
            raise RoleError(f"{self.display}/tasks/{name}: includes itself")
        if path not in self._files:
            with _LOADING:  # one run of a fleet may be pickling this role (save_plays) while another includes
                if path not in self._files:
                    rel = path.relative_to(self.path.resolve()) if path.is_relative_to(self.path.resolve()) else path
                    self._files[path] = _task_list(load_yaml(path, f"{self.display}/{rel}"), self, False,
                                                   (*stack, path), f"{self.display}/{rel}")
        return self._files[path]


@dataclass
class RoleRun:
    """A role as it runs in the play: the role and the parameters its dependant passed."""

    role: Role
    params: dict[str, Any] = field(default_factory=dict)


def _main(directory: Path) -> Path | None:
    for name in ("main.yml", "main.yaml", "main"):
        if (directory / name).is_file():
            return directory / name
    return None


def _mapping_file(role: Role, sub: str) -> dict[str, Any]:
    path = _main(role.path / sub)
    if path is None:
        return {}
    data = load_yaml(path, f"{role.display}/{sub}/{path.name}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RoleError(f"{role.display}/{sub}/{path.name}: must be a mapping of variables")
    return data


def find_role(name: str, roles_path: Sequence[Path]) -> Path:
    for base in roles_path:
        if (base / name).is_dir():
            return base / name
    raise RoleError(f"role '{name}' not found in {', '.join(map(str, roles_path))}")


def load_role(name: str, roles_path: Path | Sequence[Path]) -> Role:
    """Load one role and validate all its files (task files it imports or includes by a literal name too)."""
    paths = _paths(roles_path)
    path = find_role(name, paths)
    role = Role(name, path, f"{path.parent.name}/{name}")
    role.defaults = _mapping_file(role, "defaults")
    role.vars = _mapping_file(role, "vars")
    meta = _mapping_file(role, "meta")
    for dep in meta.get("dependencies") or []:
        where = dep.where() if isinstance(dep, LineDict) else (
            meta.where("dependencies") if isinstance(meta, LineDict) else f"{role.display}/meta/main.yml")
        if isinstance(dep, str):
            role.dependencies.append((dep, {}, where))
        elif isinstance(dep, Mapping) and (dep.get("role") or dep.get("name")):
            params = {k: v for k, v in dep.items() if k not in ("role", "name", "vars", "when", "tags")}
            params.update(dep.get("vars") or {})
            if "when" in dep or "tags" in dep:
                raise RoleError(f"{where}: 'when' and 'tags' on role dependencies are not supported")
            role.dependencies.append((str(dep.get("role") or dep.get("name")), params, where))
        else:
            raise RoleError(f"{where}: a dependency must be a role name or a mapping with 'role'")
    if _main(path / "tasks"):
        role.tasks = role.task_file(_main(path / "tasks").name)  # type: ignore[union-attr]
    handlers = _main(path / "handlers")
    if handlers:
        display = f"{role.display}/handlers/{handlers.name}"
        role.handlers = _task_list(load_yaml(handlers, display), role, True, (), display)
    return role


def _paths(roles_path: Path | Sequence[Path]) -> list[Path]:
    return [Path(roles_path)] if isinstance(roles_path, str | Path) else [Path(p) for p in roles_path]


def load_play(roles: Sequence[str], roles_path: Path | Sequence[Path]) -> list[RoleRun]:
    """The roles in the order they run: each role's dependencies first, a role with the same parameters once.

    A process reads the roles once: every later load in it gets the same play back (`create` validates the
    roles before it makes the machine, then runs exactly what it validated; a fleet's machines all run one
    play, loaded by whichever asked first). The next process gets it back from the kept plays (keep_plays())
    while no file under the roles path changed, by content."""
    key = (tuple(roles), tuple(str(p) for p in _paths(roles_path)))
    with _LOADING:
        cached = _PLAYS.get(key)
        if cached is None:
            stamp = _stamp(_paths(roles_path))
            kept = _kept_plays().get(key)
            if kept is not None and kept[0] == stamp:
                cached = _PLAYS[key] = kept
            else:
                cached = _PLAYS[key] = _unsaved[key] = (stamp, _load_play(roles, roles_path))
    return cached[1]


# load_play's cache: (roles, roles path) -> (stamp of the roles path's files, the play)
_PLAYS: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[bytes, list[RoleRun]]] = {}
_unsaved: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[bytes, list[RoleRun]]] = {}  # loaded, not yet kept
_kept_file: Path | None = None
# The machines of a fleet load their play at once: one reads, the others wait. Held again by a task file the
# loading includes, and by save_plays while it pickles the plays (their roles must not change meanwhile).
_LOADING = threading.RLock()


def keep_plays(path: Path | None) -> None:
    """Use the plays kept in `path`, and save_plays() there (None: no longer). Parsing and checking the shipped
    roles' YAML costs a command that provisions ~50 ms (with the YAML library's import); reading them back from
    `path` costs ~1 ms."""
    global _kept_file
    _kept_file = path


def _code_stamp() -> bytes:
    """What the kept plays were made with: this Python and the role engine's code (a play holds its objects)."""
    engine = sorted(Path(__file__).parent.rglob("*.py"))
    return repr([sys.version, *((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in engine)]).encode()


def _kept_plays() -> dict[Any, tuple[bytes, list[RoleRun]]]:
    """The plays kept in the file; none if it is missing, damaged, made by other code, or writable by someone
    else (unpickling it runs what it says, as loading our own code would)."""
    import pickle

    from machine.store import read_own

    data = read_own(_kept_file) if _kept_file is not None else None
    if data is None:
        return {}
    with contextlib.suppress(EOFError, ValueError, TypeError, AttributeError, ImportError, pickle.UnpicklingError):
        code, plays = pickle.loads(data)
        if code == _code_stamp() and isinstance(plays, dict):
            return plays
    return {}


def save_plays() -> None:
    """Add the plays this process loaded to the kept file (the others it holds stay); called by a run, so that a
    command refused before it writes nothing. A cache: failing to write it only costs the next run the loading."""
    import pickle

    if _kept_file is None or not _unsaved:
        return
    from machine.store import write_cache  # only a process that keeps its plays needs it

    with _LOADING:
        new = dict(_unsaved)
        _unsaved.clear()
        try:
            data = pickle.dumps((_code_stamp(), {**_kept_plays(), **new}), protocol=pickle.HIGHEST_PROTOCOL)
        except (TypeError, AttributeError, pickle.PicklingError):
            return
    write_cache(_kept_file, data)


def _stamp(paths: Sequence[Path]) -> bytes:
    """A digest of the name and content of every file under `paths`."""
    digest = hashlib.sha256()
    for base in paths:
        for directory, _, files in sorted(os.walk(base)):
            for name in sorted(files):
                path = Path(directory, name)
                digest.update(f"{path}\0".encode())
                with contextlib.suppress(OSError):  # a dangling link, say: its name is in the stamp
                    digest.update(path.read_bytes())
    return digest.digest()


def _load_play(roles: Sequence[str], roles_path: Path | Sequence[Path]) -> list[RoleRun]:
    loaded: dict[str, Role] = {}
    runs: list[RoleRun] = []

    def add(name: str, params: dict[str, Any], chain: tuple[str, ...], where: str = "") -> None:
        if name in chain:
            raise RoleError(f"{where}: role dependency cycle: {' -> '.join((*chain, name))}")
        if name not in loaded:
            try:
                loaded[name] = load_role(name, roles_path)
            except RoleError as e:
                raise RoleError(f"{where}: {e}" if where else str(e)) from None
        role = loaded[name]
        for dep, dep_params, dep_where in role.dependencies:
            add(dep, dep_params, (*chain, name), dep_where)
        if not any(r.role is role and r.params == params for r in runs):
            runs.append(RoleRun(role, params))

    for name in roles:
        add(name, {}, ())
    _check_notify(runs)
    return runs


def validate(roles: Sequence[str], roles_path: Path | Sequence[Path]) -> None:
    """Refuse bad roles without a connection: raises RoleError naming file:line and the problem."""
    load_play(roles, roles_path)


# -- tasks -------------------------------------------------------------------------------------------------
def _task_list(data: Any, role: Role, handler: bool, stack: tuple[Path, ...], display: str) -> list[Task]:
    if data is None:
        return []
    if not isinstance(data, list):
        where = data.where() if isinstance(data, LineDict) else display
        raise RoleError(f"{where}: a task file must be a list of tasks")
    tasks = []
    for i, item in enumerate(data, 1):
        if not isinstance(item, LineDict):
            raise RoleError(f"{display}: task #{i} is not a mapping")
        tasks.append(_task(item, role, handler, stack))
    return tasks


def _task(data: LineDict, role: Role, handler: bool, stack: tuple[Path, ...]) -> Task:
    if "block" in data:
        for key in data:
            if key not in BLOCK_KEYWORDS:
                raise RoleError(f"{data.where(key)}: unknown keyword '{key}' on a block")
        task = Task(data, "block", None, role)
        for part in ("block", "rescue", "always"):
            setattr(task, part, _task_list(data.get(part), role, handler, stack, data.where(part)))
        _check_keywords(task)
        return task
    allowed = HANDLER_KEYWORDS if handler else TASK_KEYWORDS
    candidates = [k for k in data if k not in allowed]
    actions = [k for k in candidates if k in MODULES or k in INCLUDE or k in META]
    if not candidates:
        raise RoleError(f"{data.where()}: task has no module")
    if not actions:
        raise RoleError(f"{data.where(candidates[0])}: unknown module '{candidates[0]}'")
    for key in candidates:
        if key not in actions:
            raise RoleError(f"{data.where(key)}: unknown keyword '{key}'")
    if len(actions) > 1:
        raise RoleError(f"{data.where(actions[1])}: conflicting actions in one task: {', '.join(actions)}")
    action = actions[0]
    raw = data[action]
    if action in INCLUDE:
        task = _include(data, action, raw, role, stack)
    elif action in META:
        if raw not in META_ACTIONS:
            raise RoleError(f"{data.where(action)}: unsupported meta action {raw!r} "
                            f"(supported: {', '.join(sorted(META_ACTIONS))})")
        task = Task(data, "meta", raw, role)
    else:
        module = MODULES[action]
        args = _module_args(module, action, raw, data)
        # `args:` (Ansible's way to give a free-form module its options) adds to the inline arguments.
        extra = data.get("args") or {}
        if not isinstance(extra, Mapping):
            raise RoleError(f"{data.where('args')}: args must be a mapping")
        args = {**extra, **args}
        problem = module.check_args(args)
        if problem:
            raise RoleError(f"{data.where(action)}: {problem}")
        _check_source(module, args, role, data.where(action))
        task = Task(data, action, args, role, module)
    _check_keywords(task)
    return task


@cache
def shared_templar() -> Templar:
    """One Templar per process: what validating the roles compiled, their run finds compiled (its cache)."""
    return Templar()


def _check_source(module: type[Module], args: Mapping[str, Any], role: Role, where: str) -> None:
    """A literal template/copy `src` must exist, and a template must compile: refused before the play runs
    rather than halfway through it, on the machine."""
    kind = _SOURCES.get(module.names[0])
    src = args.get("src")
    if kind is None or not isinstance(src, str) or is_template(src):
        return
    path = role.find_source(kind, src)
    if path is None:
        raise RoleError(f"{where}: could not find src '{src}' (searched {role.display}/{kind}/)")
    if kind == "templates":
        shown = f"{role.display}/{path.relative_to(role.path)}" if path.is_relative_to(role.path) else str(path)
        shared_templar().check_file(path, shown)


def _module_args(module: type[Module], action: str, raw: Any, data: LineDict) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return dict(raw)
    if not isinstance(raw, str):
        raise RoleError(f"{data.where(action)}: arguments of '{action}' must be a mapping")
    if module.free_form:
        return module.parse_free_form(raw)  # type: ignore[attr-defined]
    pairs, rest = split_kv(raw)
    if rest:
        raise RoleError(f"{data.where(action)}: '{action}' takes key=value arguments, not {' '.join(rest)!r}")
    return pairs


def _include(data: LineDict, action: str, raw: Any, role: Role, stack: tuple[Path, ...]) -> Task:
    kind = INCLUDE[action]
    if isinstance(raw, Mapping):
        extra = set(raw) - {"file"}
        if extra or "file" not in raw:
            raise RoleError(f"{data.where(action)}: {kind} takes a file name (or 'file:'), "
                            f"not {', '.join(sorted(extra)) or 'nothing'}")
        raw = raw["file"]
    if not isinstance(raw, str) or not raw:
        raise RoleError(f"{data.where(action)}: {kind} needs a file name")
    task = Task(data, kind, raw, role)
    if kind == "include_tasks":
        bad = sorted(set(data) - _INCLUDE_KEYWORDS - {action})
        if bad:
            raise RoleError(f"{data.where(bad[0])}: '{bad[0]}' cannot be used with include_tasks (Ansible refuses it: "
                            f"put it on a block around the include, or on the included tasks)")
    if kind == "import_tasks":
        bad = _STATIC_FORBIDDEN & set(data)
        if bad:
            raise RoleError(f"{data.where(min(bad))}: '{min(bad)}' cannot be used with import_tasks "
                            f"(use include_tasks)")
        if is_template(raw):
            raise RoleError(f"{data.where(action)}: import_tasks needs a literal file name (use include_tasks)")
    if not is_template(raw):
        try:
            task.tasks = role.task_file(raw, stack)
        except RoleError as e:
            raise RoleError(f"{data.where(action)}: {e}") from None
    return task


def _check_templates(task: Task) -> None:
    """Compile the task's conditions, loop and arguments, so that a Jinja syntax error or an unknown filter is
    refused (naming the keyword's line) before the play starts, not when the task is reached."""
    for key, condition in _TEMPLATED:
        if key in task.data:
            try:
                shared_templar().check(task.data[key], condition)
            except RoleError as e:
                raise RoleError(f"{task.data.where(key)}: {e}") from None
    if task.module is not None:
        try:
            shared_templar().check(task.args)
        except RoleError as e:
            raise RoleError(f"{task.where}: {e}") from None


def _check_keywords(task: Task) -> None:
    _check_templates(task)
    d = task.data
    if "loop" in d and "with_items" in d:
        raise RoleError(f"{d.where('with_items')}: use either loop or with_items, not both")
    control = d.get("loop_control")
    if control is not None:
        if not isinstance(control, Mapping):
            raise RoleError(f"{d.where('loop_control')}: loop_control must be a mapping")
        for key in control:
            if key not in LOOP_CONTROL:
                raise RoleError(f"{d.where('loop_control')}: unsupported loop_control option '{key}'")
    if "register" in d and (problem := invalid_name(d["register"])):  # Ansible's words
        raise RoleError(f"{d.where('register')}: Invalid 'register' specified: {problem}")
    for key in ("vars", "environment"):
        if key in d and not isinstance(d[key], Mapping):
            raise RoleError(f"{d.where(key)}: {key} must be a mapping")
    for problem in map(invalid_name, d.get("vars") or {}):
        if problem:
            raise RoleError(f"{d.where('vars')}: {problem}")
    if "notify" in d and not isinstance(d["notify"], str | list):
        raise RoleError(f"{d.where('notify')}: notify must be a handler name or a list of them")


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def handler_names(runs: Sequence[RoleRun]) -> dict[str, list[Task]]:
    """Every name a task may notify -> the handlers it triggers, as Ansible (2.19) finds them: it searches the
    roles' handlers from the last role loaded back, each role's from its first handler on. By name (or
    `role : name`) only the first handler found runs; by `listen` topic every handler listening, but of those
    with the same name only the first found."""
    by_name: dict[str, Task] = {}
    by_topic: dict[str, dict[Any, Task]] = {}
    for run in reversed(runs):
        for handler in run.role.handlers:
            name = handler.get("name")
            if name:
                by_name.setdefault(str(name), handler)
                by_name.setdefault(f"{run.role.name} : {name}", handler)
            for topic in as_list(handler.get("listen")):
                by_topic.setdefault(str(topic), {}).setdefault(str(name) if name else id(handler), handler)
    names = {key: [handler] for key, handler in by_name.items()}
    for topic, listening in by_topic.items():
        found = names.setdefault(topic, [])
        found += [h for h in listening.values() if not any(h is f for f in found)]
    return names


def walk(tasks: Sequence[Task]) -> Any:
    for task in tasks:
        yield task
        yield from walk(task.block + task.rescue + task.always + (task.tasks or []))


def _check_notify(runs: Sequence[RoleRun]) -> None:
    names = handler_names(runs)
    for run in runs:
        for task in walk([*run.role.tasks, *run.role.handlers]):
            for target in as_list(task.get("notify")):
                if isinstance(target, str) and not is_template(target) and target not in names:
                    raise RoleError(f"{task.data.where('notify')}: no handler named '{target}'")
