"""What every module shares: declared arguments, the task's context, and the result as Ansible registers it."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from machine.roles.remote import Become, Remote, attrs_script, parse_mode
from machine.roles.templating import Templar, Vars, is_template, to_bool

# What the task's line shows of a result that did not fail (debug's, assert's without `quiet`): Ansible shows such
# a result whole (`_ansible_verbose_always`), pymachine this text. The play takes it out before registering it.
SHOWN = "_ansible_verbose_always"


class ModuleFailure(Exception):
    """The module could not reach the desired state; `extra` goes into the registered result."""

    def __init__(self, msg: str, **extra: Any) -> None:
        super().__init__(msg)
        self.msg = msg
        self.extra = extra


@dataclass(frozen=True)
class Arg:
    required: bool = False
    default: Any = None
    aliases: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None
    type: str = "raw"  # raw, str, bool, int, list, dict


@dataclass
class Context:
    """Everything a module may use besides its arguments."""

    remote: Remote
    templar: Templar
    vars: Vars
    facts: Mapping[str, Any]
    search_paths: Mapping[str, list[Path]]  # "templates" / "files" -> directories of the task's role
    become: Become = field(default_factory=Become)
    env: Mapping[str, Any] = field(default_factory=dict)
    check: bool = False
    diff: bool = False

    def run(self, script: str, stdin: bytes | None = None, timeout: float | None = None) -> Any:
        return self.remote.run(script, stdin=stdin, become=self.become, env=self.env, timeout=timeout)

    def known(self, kind: str, name: str) -> Any:
        """What the play read ahead of a file or a unit (Remote.read_ahead), if nothing ran since; else None."""
        return self.remote.known(kind, name, self.become)


def _coerce(name: str, value: Any, kind: str) -> Any:
    if value is None or kind == "raw":
        return value
    if kind == "bool":
        return to_bool(value)
    if kind == "int":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ModuleFailure(f"argument '{name}' must be an integer, got {value!r}") from None
    if kind == "list":
        if isinstance(value, str):
            return [x.strip() for x in value.split(",") if x.strip()]
        return list(value) if isinstance(value, list | tuple) else [value]
    if kind == "dict":
        if not isinstance(value, Mapping):
            raise ModuleFailure(f"argument '{name}' must be a dictionary")
        return dict(value)
    return str(value)


class Module:
    """A module class: `names` it answers to, declared `args`, and `run()` returning the result dict."""

    names: ClassVar[tuple[str, ...]] = ()
    args: ClassVar[dict[str, Arg]] = {}
    # Free-form modules take a string (command line, or `k=v` pairs are not split); `_raw_params` holds it.
    free_form: ClassVar[bool] = False
    # Any argument is accepted (set_fact).
    open_args: ClassVar[bool] = False
    # What the module reads first, when it can use what the play read ahead (Remote.read_ahead): the kind
    # ("file" or "unit") and the argument naming it.
    reads: ClassVar[tuple[str, str] | None] = None

    @classmethod
    def reading(cls, args: Mapping[str, Any]) -> str | None:
        """The name of what the module will read first with these (templated) arguments, if `reads` says."""
        if cls.reads is None:
            return None
        name = next((args[k] for k, arg in cls.arg_names().items() if arg == cls.reads[1] and k in args), None)
        return name if isinstance(name, str) else None

    def __init__(self, ctx: Context, args: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.params = self.normalize(args)

    @classmethod
    @cache
    def arg_names(cls) -> dict[str, str]:
        """Every accepted spelling -> canonical argument name (computed once per module: do not change it)."""
        out = {name: name for name in cls.args}
        for name, spec in cls.args.items():
            out.update(dict.fromkeys(spec.aliases, name))
        return out

    @classmethod
    def check_args(cls, args: Mapping[str, Any]) -> str | None:
        """Why `args` (as written in the task, before templating) are not acceptable, or None."""
        if cls.open_args:
            return None
        names = cls.arg_names()
        for key in args:
            if key not in names:
                return f"unsupported argument '{key}' for module '{cls.names[0]}'"
        given = {names[k] for k in args}
        for name, spec in cls.args.items():
            if spec.required and name not in given:
                return f"missing required argument '{name}' for module '{cls.names[0]}'"
            value = args.get(name)
            if spec.choices and isinstance(value, str) and "{{" not in value and value not in spec.choices:
                return f"argument '{name}' of module '{cls.names[0]}' must be one of {', '.join(spec.choices)}"
        # A literal mode the modules cannot apply (symbolic) is refused now, not when the task is reached.
        mode = args.get("mode")
        if "mode" in cls.args and mode is not None and not (isinstance(mode, str) and is_template(mode)):
            try:
                parse_mode(mode)
            except ValueError as e:
                return f"{e} (module '{cls.names[0]}')"
        return None

    def normalize(self, args: Mapping[str, Any]) -> dict[str, Any]:
        if self.open_args:
            return dict(args)
        names = self.arg_names()
        out = {name: spec.default for name, spec in self.args.items()}
        for key, value in args.items():
            out[names[key]] = value
        for name, spec in self.args.items():
            out[name] = _coerce(name, out[name], spec.type)
            if spec.required and out[name] is None:
                raise ModuleFailure(f"argument '{name}' is required")
            if spec.choices and out[name] is not None and out[name] not in spec.choices:
                raise ModuleFailure(f"argument '{name}' must be one of {', '.join(map(str, spec.choices))}, "
                                    f"got {out[name]!r}")
        return out

    def run(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------------
    def sh(self, script: str, stdin: bytes | None = None, *, what: str = "", timeout: float | None = None) -> Any:
        """Run `script`; a non-zero exit fails the task with the script's own error output."""
        result = self.ctx.run(script, stdin=stdin, timeout=timeout)
        if result.rc != 0:
            detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise ModuleFailure(f"{what or 'command'} failed (rc={result.rc})" + (f": {detail[-1]}" if detail else ""),
                                rc=result.rc, stdout=result.stdout, stderr=result.stderr)
        return result

    def ensure_attributes(self, dest: str, current: Any, mode: int | None, result: dict[str, Any]) -> dict[str, Any]:
        """Give `dest` the task's mode, owner and group where they differ; record the change in `result`."""
        script, changes = attrs_script(dest, current, mode, self.params["owner"], self.params["group"])
        if script:
            result.update(changed=True, msg=", ".join(changes))
            if not self.ctx.check:
                self.sh(script, what=f"setting attributes of {dest}")
        return result

    def find_source(self, kind: str, name: str) -> Path:
        """A `src` of template/copy: absolute, or looked up in the role's templates/ or files/ like Ansible."""
        path = Path(name)
        if path.is_absolute():
            if path.exists():
                return path
        else:
            for directory in self.ctx.search_paths.get(kind, []):
                if (directory / path).exists():
                    return directory / path
        raise ModuleFailure(f"could not find src '{name}' (searched the role's {kind}/)")


def unified_diff(before: str, after: str, path: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f"before: {path}", tofile=f"after: {path}"))


def split_kv(text: str) -> tuple[dict[str, str], list[str]]:
    """Ansible's `k=v k2="v 2" k3={{ a }}` argument strings; words without `=` are returned as free form.

    Whitespace inside quotes or inside `{{ }}` / `{% %}` does not split, as in Ansible's own parser."""
    words, current, depth, quote = [], "", 0, ""
    i = 0
    while i < len(text):
        two = text[i:i + 2]
        if not quote and two in ("{{", "{%"):
            depth, current, i = depth + 1, current + two, i + 2
            continue
        if not quote and depth and two in ("}}", "%}"):
            depth, current, i = depth - 1, current + two, i + 2
            continue
        ch = text[i]
        if quote:
            if ch == quote:
                quote = ""
            else:
                current += ch
        elif ch in "\"'" and not depth:
            quote = ch
        elif ch.isspace() and not depth:
            if current:
                words.append(current)
            current = ""
        else:
            current += ch
        i += 1
    if current:
        words.append(current)
    pairs: dict[str, str] = {}
    rest: list[str] = []
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key.isidentifier():
            pairs[key] = value
        else:
            rest.append(word)
    return pairs, rest
