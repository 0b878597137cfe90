"""Jinja2 evaluation as Ansible does it: lazy variables, native values for a lone `{{ expr }}`, strict undefined.

Variables are layered (role defaults at the bottom, extra vars on top) and a variable whose value is itself a
template is rendered only when something uses it, so a default may refer to a fact or to another default.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import itertools
import json
import marshal
import operator
import os
import posixpath
import re
import shlex
import sys
from collections.abc import (
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    MutableSequence,
    ValuesView,
)
from pathlib import Path
from types import CodeType
from typing import Any

import jinja2
from jinja2 import ChainableUndefined, StrictUndefined, Undefined, nodes
from jinja2.lexer import TOKEN_STRING, TOKEN_VARIABLE_BEGIN, TOKEN_VARIABLE_END, Lexer
from jinja2.parser import Parser
from jinja2.utils import missing

from machine.roles.yamlload import RoleError, Unsafe

# Ansible's `omit`: an argument templated to this value is dropped from the module's arguments.
OMIT = f"__omit_place_holder__{os.urandom(20).hex()}"

_LONE_EXPR = re.compile(r"\{\{-?(.*?)-?\}\}", re.S)


class TemplateFailure(RoleError):
    """A template or expression could not be evaluated (undefined variable, syntax, filter error)."""


class UndefinedFailure(TemplateFailure):
    """A template or expression used an undefined value."""


def is_template(value: str) -> bool:
    return not isinstance(value, Unsafe) and ("{{" in value or "{%" in value or "{#" in value)


_RESULT = "pm_result_"


def _assignment(env: jinja2.Environment, expr: str) -> nodes.Template:
    """A bare expression as a template that stores its value in `_RESULT`, so that it is evaluated, not printed.
    It is read as `{{ }}` content (`env`'s lexer sees it so), as Jinja's compile_expression does."""
    parser = Parser(env, expr, state="variable")
    value = parser.parse_tuple(with_condexpr=True)
    if not parser.stream.eos:
        parser.fail(f"unexpected {parser.stream.current.value!r} after the expression", parser.stream.current.lineno)
    template = nodes.Template([nodes.Assign(nodes.Name(_RESULT, "store"), value, lineno=1)], lineno=1)
    template.set_environment(env)
    _refuse_outside_subset(template)
    return template


# Ansible's, but outside the subset (docs/ansible-subset.md): refused when the template is compiled (before the
# play starts, naming the task's line or the template file's), not found undefined when the task runs. Only a
# call of the lookup functions: a variable of the same name (`q`) is the role's own.
_OUTSIDE_CALLS = frozenset({"lookup", "query", "q"})
_OUTSIDE_NAMES = frozenset({"hostvars", "groups", "group_names", "play_hosts", "ansible_play_hosts",
                            "ansible_play_hosts_all", "ansible_play_batch"})


class OutsideSubset(TemplateFailure):
    """A template uses what Ansible has but pymachine does not run; `lineno` is its line in the template."""

    def __init__(self, what: str, lineno: int, template: str | None) -> None:
        super().__init__(f"{what} is outside the Ansible subset pymachine runs (docs/ansible-subset.md)")
        self.lineno = lineno
        self.template = template  # a template file's name (one it includes, say), None for a task's template


def _refuse_outside_subset(tree: nodes.Template, template: str | None = None) -> None:
    called = {id(call.node) for call in tree.find_all(nodes.Call)}
    for name in tree.find_all(nodes.Name):
        if name.ctx == "load" and (name.name in _OUTSIDE_NAMES or (name.name in _OUTSIDE_CALLS and id(name) in called)):
            raise OutsideSubset(f"{name.name}()" if name.name in _OUTSIDE_CALLS else name.name, name.lineno, template)


class _SubsetEnvironment(jinja2.Environment):
    """Refuses what is outside the subset as it parses a template: a task's, a template file and the files it
    includes alike (Jinja parses every one of them here)."""

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        _refuse_outside_subset(tree, name)
        return tree


class _ArgumentLexer(Lexer):
    """ansible-core's lexer for task arguments and variables (AnsibleLexer): a backslash in a string literal inside
    `{{ }}` stands for itself, because YAML has already read the escapes of the text around it; so
    `regex_replace('(\\d)', '<\\1>')` written in a task means what it shows. String literals in `{% %}` statements
    keep Jinja's escapes, and conditions and template files are read as Jinja reads them."""

    def tokeniter(self, source: str, name: str | None, filename: str | None = None,
                  state: str | None = None) -> Iterator[tuple[int, str, str]]:
        in_expression = state == "variable"  # an expression read alone: the content of a lone `{{ }}`
        for lineno, kind, value in super().tokeniter(source, name, filename, state):
            if kind == TOKEN_VARIABLE_BEGIN:
                in_expression = True
            elif kind == TOKEN_VARIABLE_END:
                in_expression = False
            elif in_expression and kind == TOKEN_STRING:
                value = value.replace("\\", "\\\\")
            yield lineno, kind, value


class _ArgumentEnvironment(_SubsetEnvironment):
    """The environment of task arguments and variables: Ansible's lexer. Never overlaid (an overlay would share the
    lexer cached for this environment's settings)."""

    @functools.cached_property
    def lexer(self) -> Lexer:  # type: ignore[override]  # a property in Jinja, computed once here
        return _ArgumentLexer(self)


_SCALARS = (str, int, float, type(None))


def _defined(value: Any) -> Any:
    """`value`, unless it is or holds (in a list or dict, at any depth) an undefined value: then UndefinedFailure
    naming what is missing, as Ansible fails a lazy container's undefined item once the value is final."""
    if isinstance(value, _SCALARS):  # most values: no ABC checks for them (templating a role makes thousands)
        return value
    if isinstance(value, Undefined):
        # Jinja's own Undefined (an inline `if` without `else`) would print as nothing: as in Ansible it is no
        # value, and not an undefined variable either (`default` does not replace a variable holding one).
        failure = UndefinedFailure if isinstance(value, AnsibleUndefined) else TemplateFailure
        raise failure(value._undefined_message)
    if isinstance(value, Mapping):
        for key, item in value.items():
            _defined(key)
            _defined(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _defined(item)
    return value


# What Ansible 2.19 turns into a list: the result of a filter (`map`, `select`, `dict2items`...) and the final
# value of a template (`{{ d.keys() }}`), so that `x | map(...)` can be looped over, measured and printed.
_ITERATORS = (Iterator, ItemsView, KeysView, ValuesView, range)


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, _ITERATORS) else value


def _listing(plugin: Any) -> Any:
    """A filter whose iterator result is a list, as Ansible's filters' are (Jinja's pass_* marks are kept)."""
    @functools.wraps(plugin)
    def listing(*args: Any, **kwargs: Any) -> Any:
        return _listed(plugin(*args, **kwargs))
    return listing


def _output(value: Any) -> Any:
    """What `{{ }}` puts into text, as Ansible's: None is nothing (`key={{ none }}` gives `key=`), and so is an
    inline `if` without `else` (Jinja's own Undefined); a value that is or holds an undefined one fails; an
    iterator, and a tuple at any depth, is printed as a list."""
    return "" if value is None or type(value) is Undefined else _plain(_listed(value))


def _trailing_newlines(text: str) -> int:
    return len(text) - len(text.rstrip("\n"))


def _environment(cls: type[jinja2.Environment]) -> jinja2.Environment:
    env = cls(undefined=AnsibleUndefined, keep_trailing_newline=False, autoescape=False, finalize=_output,
              extensions=["jinja2.ext.do", "jinja2.ext.loopcontrols"])
    env.filters.update(FILTERS)
    env.filters.update({name: _listing(plugin) for name, plugin in env.filters.items()})
    env.tests.update(TESTS)
    env.globals["omit"] = OMIT
    return env


def type_name(value: Any) -> str:
    """The name of `value`'s type as Ansible's messages give it: the builtin type a LineDict or Unsafe stands for."""
    return next(c.__name__ for c in type(value).__mro__ if c.__module__ == "builtins")


# Names Jinja reads as something else: no variable can be called so (Ansible's JINJA_KEYWORDS).
_JINJA_KEYWORDS = frozenset({"true", "false", "none", "True", "False", "None", "not"})


def invalid_name(name: Any) -> str | None:
    """Why `name` cannot name a variable, in Ansible's words (validate_variable_name), or None when it can: it
    must be an ASCII identifier that Jinja does not read as something else."""
    if isinstance(name, str) and name.isidentifier() and name.isascii() and name not in _JINJA_KEYWORDS:
        return None
    what = f"name {str(name)!r}" if isinstance(name, str | int | float | bool | None) else "name"
    return f"Invalid variable {what}{'' if isinstance(name, str) else f' of type {type_name(name)!r}'}."


class AnsibleUndefined(ChainableUndefined, StrictUndefined):
    """Ansible's undefined value: strict in every use (output, comparison, iteration, truth), but an attribute or
    item of it is itself, so that `foo.bar | default(x)` and `foo.bar is defined` work with `foo` undefined, and
    using `foo.bar` names `foo`, the variable that is missing."""

    __slots__ = ()

    def __init__(self, hint: str | None = None, obj: Any = missing, name: str | None = None,
                 exc: type[jinja2.TemplateRuntimeError] = jinja2.UndefinedError) -> None:
        if not hint and name and obj is not missing:  # Ansible's wording
            hint = f"object of type {type_name(obj)!r} has no attribute {name!r}"
        super().__init__(hint, obj, name, exc)


class Vars(Mapping[str, Any]):
    """Layered variables, highest layer last. Values of `raw` layers (facts, registered results) are never
    templated again; the others are templated on first use and cached for the lifetime of this object."""

    def __init__(self, templar: Templar, layers: Iterable[tuple[Mapping[str, Any], bool]]) -> None:
        self._templar = templar
        self._layers = list(layers)
        self._cache: dict[str, Any] = {}
        self._resolving: set[str] = set()

    def child(self, top: Mapping[str, Any]) -> Vars:
        """These variables plus `top` (already templated values, e.g. a loop item) above them all."""
        return Vars(self._templar, [*self._layers, (top, True)])

    def __getitem__(self, key: str) -> Any:
        if key in self._cache:
            return self._cache[key]
        layer, raw = next(((lay, r) for lay, r in reversed(self._layers) if key in lay), (None, True))
        if layer is None:
            return self._templar.env.globals[key]  # KeyError when undefined, which Jinja expects
        value = layer[key]
        if not raw:
            value = self._resolve(key, value)
        self._cache[key] = value
        return value

    def _resolve(self, key: str, value: Any) -> Any:
        """The templated value of variable `key` (Templar.resolve). As in Ansible, a variable whose template uses an
        undefined name is undefined itself: `default` and `is defined` see it so, and using it fails naming what is
        missing."""
        if key in self._resolving:
            raise TemplateFailure(f"recursive loop detected in template of variable '{key}'")
        self._resolving.add(key)
        try:
            return self._templar.resolve(value, self)
        finally:
            self._resolving.discard(key)

    def __contains__(self, key: object) -> bool:
        return any(key in layer for layer, _ in self._layers) or key in self._templar.env.globals

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(k for layer, _ in self._layers for k in layer))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class CodeCache(jinja2.BytecodeCache):
    """Compiled template code by template name and source digest, shared by a Templar's environments.

    Compiling (parsing, generating and compiling Python) the few hundred templates of the shipped roles is most
    of what loading them costs; once `keep(path)` is called, the code is also kept in one file between runs, so
    a process loading unchanged roles compiles nothing. The file holds code for one Python, one Jinja and one set
    of filters and tests (`stamp`): Jinja refuses an unknown filter when it compiles, so code compiled with
    another set is not used."""

    def __init__(self, stamp: str) -> None:
        self._stamp = stamp
        self._code: dict[tuple[str, str], CodeType] = {}
        self._used: set[tuple[str, str]] = set()
        self._file: Path | None = None
        self._dirty = False

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        bucket.code = self._code.get((bucket.key, bucket.checksum))
        if bucket.code is not None:
            self._used.add((bucket.key, bucket.checksum))

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        if bucket.code is not None:
            self._code[bucket.key, bucket.checksum] = bucket.code
            self._used.add((bucket.key, bucket.checksum))
            self._dirty = True

    def keep(self, path: Path) -> None:
        """Use the code `path` holds, and save() there; a missing, damaged or outdated file is ignored, and so is
        one that someone else could have written (its code would run as ours)."""
        from machine.store import read_own

        self._file = path
        data = read_own(path)
        if data is None:
            return
        with contextlib.suppress(ValueError, EOFError, TypeError):
            stamp, code = marshal.loads(data)
            if stamp == self._stamp and isinstance(code, dict):
                self._code = {**code, **self._code}

    def save(self) -> None:
        """Write the code this process used to the kept file if anything was compiled since it was read (so code
        of templates edited since is dropped, not kept forever). A cache: a failure to write it only costs the
        next run the compiling."""
        if self._file is None or not self._dirty:
            return
        from machine.store import write_cache  # only a process that keeps its code needs it

        self._dirty = False
        used = set(self._used)  # copies first: other threads (a fleet's machines) may be adding
        write_cache(self._file, marshal.dumps((self._stamp, {k: v for k, v in dict(self._code).items() if k in used})))


# What compiling a template does besides Jinja's own work: code kept from a pymachine whose compiling did less
# (a template file using lookup() compiled before those were refused, output finalized otherwise, a trailing
# newline kept) is not used. Changed with what it does.
_COMPILING = "5"


class _FileLoader(jinja2.FileSystemLoader):
    """Jinja's, noting in `newlines` how many newlines each file it reads ends with (by its file name): Jinja
    reads a file again only when it changed, and Templar._render needs the count at every rendering."""

    def __init__(self, directory: str, newlines: dict[str, int]) -> None:
        super().__init__(directory)
        self._newlines = newlines

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Any]:
        source, filename, uptodate = super().get_source(environment, template)
        self._newlines[filename] = _trailing_newlines(source)
        return source, filename, uptodate


class Templar:
    def __init__(self) -> None:
        self.env = _environment(_ArgumentEnvironment)
        self._condition_env = _environment(_SubsetEnvironment)
        self.code = CodeCache("|".join([sys.version, jinja2.__version__, _COMPILING, *sorted(self.env.filters), "",
                                        *sorted(self.env.tests), "", *sorted(self.env.extensions)]))
        # The template module renders files with Ansible's defaults: trim_blocks on.
        self._file_env = self._condition_env.overlay(trim_blocks=True, bytecode_cache=self.code)
        self._file_envs: dict[Path, jinja2.Environment] = {}
        self._file_newlines: dict[str, int] = {}  # by file name: how many newlines each template file ends with

    def template(self, value: Any, variables: Mapping[str, Any]) -> Any:
        """Template strings inside `value` (recursively through lists and dicts), as Ansible finalizes a task's
        arguments: an undefined value anywhere in the result fails (UndefinedFailure), one that a list or dict
        holds too (`{{ [a, missing] }}`)."""
        if isinstance(value, str):
            return _defined(_listed(self._string(value, variables)))
        if isinstance(value, Mapping):
            return {self.template(k, variables): self.template(v, variables) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.template(v, variables) for v in value]
        return value

    def resolve(self, value: Any, variables: Mapping[str, Any]) -> Any:
        """`value` templated as the value of a variable, lazily as Ansible 2.19 does: a string whose template uses
        an undefined name is undefined itself, while a list or dict (written in YAML or as a Jinja literal) keeps
        such a value in its place and is defined as a whole; the undefined value fails only where it is used."""
        if isinstance(value, str):
            try:
                return self._string(value, variables)
            except UndefinedFailure as e:
                return self.env.undefined(hint=str(e))
        if isinstance(value, Mapping):
            return {self.template(k, variables): self.resolve(v, variables) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.resolve(v, variables) for v in value]
        return value

    def _string(self, value: str, variables: Mapping[str, Any]) -> Any:
        if not is_template(value):
            return value
        lone = _LONE_EXPR.fullmatch(value)
        if lone and "{{" not in lone.group(1) and "{%" not in lone.group(1):
            return self._expression(lone.group(1), variables, "expression")
        return self._render(self._compile(value), variables, _trailing_newlines(value))

    def condition(self, expr: Any, variables: Mapping[str, Any]) -> bool:
        """Evaluate a `when`/`changed_when`/`failed_when` value; a list means all of them."""
        if isinstance(expr, list):
            return all(self.condition(e, variables) for e in expr)
        if isinstance(expr, bool):
            return expr
        if expr is None:
            return False
        text = str(expr)
        if is_template(text):
            text = str(self.template(text, variables))
        result = self._expression(text, variables, "condition")
        try:
            truth = bool(result)
        except jinja2.UndefinedError as e:
            raise TemplateFailure(f"error in conditional '{text}': {e.message}") from None
        if not isinstance(result, bool):  # as ansible-core 2.19: `when: s` with s: "false" would otherwise run
            raise TemplateFailure(f"Conditional result ({truth}) was derived from value of type "
                                  f"'{type(result).__name__}' in '{text}'. Conditionals must have a boolean result.")
        return truth

    def render_file(self, path: Path, variables: Mapping[str, Any]) -> str:
        try:
            template = self._file_template(path)
            return self._render(template, variables, self._file_newlines[str(template.filename)])
        except jinja2.TemplateSyntaxError as e:
            raise TemplateFailure(f"{path.name}:{e.lineno}: template syntax error: {e.message}") from None
        except OutsideSubset as e:  # in the file or in one it includes
            raise TemplateFailure(f"{e.template or path.name}:{e.lineno}: {e}") from None

    def check(self, value: Any, condition: bool = False) -> None:
        """Compile every template in `value` (a condition's bare expression too) without evaluating anything:
        a syntax error or an unknown filter raises TemplateFailure before the play starts."""
        if isinstance(value, str):
            if is_template(value):
                self._compile(value)
            elif condition and not isinstance(value, Unsafe):
                self._compile(value, "condition")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                self.check(key)
                self.check(item)
        elif isinstance(value, list | tuple):
            for item in value:
                self.check(item, condition)

    def check_file(self, path: Path, display: str) -> None:
        """Compile a template file as the template module will (unknown filters included), without rendering
        it: a syntax error is refused before the play starts, naming `display:line`."""
        try:
            path.read_text()  # Jinja's loader would say less about a file it cannot read
        except (OSError, UnicodeDecodeError) as e:
            raise RoleError(f"{display}: cannot read the template: {getattr(e, 'strerror', None) or e}") from None
        try:
            self._file_template(path)
        except jinja2.TemplateSyntaxError as e:
            raise RoleError(f"{display}:{e.lineno}: template syntax error: {e.message}") from None
        except OutsideSubset as e:
            raise RoleError(f"{display}:{e.lineno}: {e}") from None

    def _file_template(self, path: Path) -> jinja2.Template:
        """`path` compiled, once per process while it is unchanged (Jinja's cache checks its mtime); includes
        and imports in it are found next to it."""
        env = self._file_envs.get(path.parent)
        if env is None:
            env = self._file_envs[path.parent] = self._file_env.overlay(
                loader=_FileLoader(str(path.parent), self._file_newlines))
        return env.get_template(path.name)

    # -- internals -------------------------------------------------------------------------------------
    def _expression(self, expr: str, variables: Mapping[str, Any], kind: str) -> Any:
        template = self._compile(expr, kind)
        context = template.new_context(variables, shared=True)
        self._consume(template, context)
        result = context.vars[_RESULT]
        if isinstance(result, Undefined):
            # Assigning an undefined value does not raise; using it would, later and far from the task.
            _defined(result)
        return result

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one Templar per run; compiling dominates a no-op run otherwise
    def _compile(self, source: str, kind: str = "template") -> jinja2.Template:
        """`source` compiled as a `template` or an `expression` of task arguments, or as a `condition` (an
        expression whose string literals keep Jinja's escapes, as in Ansible)."""
        env = self._condition_env if kind == "condition" else self.env
        # Named by kind: code compiled as another kind (or by a version that read every kind as Jinja does) differs.
        bucket = self.code.get_bucket(env, f"<{kind}>", None, source)
        if bucket.code is None:
            try:
                bucket.code = env.compile(env.parse(source) if kind == "template" else _assignment(env, source))
            except jinja2.TemplateSyntaxError as e:
                raise TemplateFailure(f"template syntax error in {source!r}: {e.message}") from None
            self.code.set_bucket(bucket)
        # What Environment.from_string does with the code it compiles, but with the globals as a plain dict: every
        # evaluation's context makes a set of their names, which from Jinja's ChainMap costs ~10 µs in Python.
        return env.template_class.from_code(env, bucket.code, dict(env.globals), None)

    def _render(self, template: jinja2.Template, variables: Mapping[str, Any], newlines: int) -> str:
        """`template` (whose source ends with `newlines` newlines) rendered. As Ansible's: Jinja drops the last
        newline of every template (of one included too), then the newlines the source ends with are put back where
        the text ends with fewer; so a file ending with `{% endif %}` and a newline ends with that newline."""
        # shared=True hands Jinja our lazy mapping instead of a copy that would template every variable.
        context = template.new_context(variables, shared=True)
        text = self._consume(template, context)
        return text + "\n" * (newlines - _trailing_newlines(text))  # nothing when not positive

    @staticmethod
    def _consume(template: jinja2.Template, context: Any) -> str:
        try:
            return "".join(template.root_render_func(context))
        except jinja2.UndefinedError as e:
            raise UndefinedFailure(e.message or "undefined variable") from None
        except jinja2.TemplateError as e:
            raise TemplateFailure(str(e.message if hasattr(e, "message") else e)) from None
        except TemplateFailure:
            raise
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, re.error) as e:
            raise TemplateFailure(f"template error: {type(e).__name__}: {e}") from None


# -- filters -------------------------------------------------------------------------------------------
def to_bool(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        value = value.strip().lower()
    return value in ("yes", "on", "1", "true", "y", 1)


def _bool(value: Any) -> bool:
    """ansible-core 2.19's `bool` filter: these words in any case (not stripped), and ints and booleans by their
    text; anything else is whether it equals 1 (deprecated there), so 'y' and 't' are false."""
    text = str(value).lower() if isinstance(value, str | int) else value
    if text in ("yes", "on", "true", "1"):
        return True
    if text in ("no", "off", "false", "0"):
        return False
    return bool(text == 1)


def _mandatory(value: Any, msg: str | None = None) -> Any:
    if isinstance(value, Undefined):
        name = getattr(value, "_undefined_name", None)
        raise TemplateFailure(msg or f"Mandatory variable {name!r} not defined.")
    return value


# How ansible.utils.vars.merge_hash merges a list of a higher dict (`new`) into the same key's list (`old`).
_LIST_MERGES: dict[str, Any] = {
    "replace": lambda old, new: new,
    "keep": lambda old, new: old,
    "append": lambda old, new: old + new,
    "prepend": lambda old, new: new + old,
    "append_rp": lambda old, new: [x for x in old if x not in new] + new,  # rp: old items that new has are removed
    "prepend_rp": lambda old, new: new + [x for x in old if x not in new],
}


def _merge_hash(low: Any, high: Any, recursive: bool, list_merge: str) -> Any:
    """Ansible's merge_hash: `high`'s keys win; dicts under both are merged if `recursive`, lists by `list_merge`."""
    if list_merge not in _LIST_MERGES:
        raise TemplateFailure("merge_hash: 'list_merge' argument can only be equal to 'replace', 'keep', 'append', "
                              "'prepend', 'append_rp' or 'prepend_rp'")
    if not (isinstance(low, MutableMapping) and isinstance(high, MutableMapping)):
        raise TemplateFailure(f"failed to combine variables, expected dicts but got a '{type(low).__name__}' and a "
                              f"'{type(high).__name__}'.")
    if low == high:  # Ansible's shortcut, which shows: equal dicts' lists are not appended to each other
        return dict(high)
    out = dict(low)
    for key, new in high.items():
        old = out.get(key)
        if key not in out:
            out[key] = new
        elif isinstance(old, MutableMapping) and isinstance(new, MutableMapping):
            out[key] = _merge_hash(old, new, recursive, list_merge) if recursive else new
        elif isinstance(old, MutableSequence) and isinstance(new, MutableSequence):
            out[key] = _LIST_MERGES[list_merge](old, new)
        else:
            out[key] = new
    return out


def _combine(*terms: Any, recursive: bool = False, list_merge: str = "replace") -> Any:
    """Ansible's combine: the dicts given, or in lists given, merged from left to right (right wins)."""
    dicts = _flatten(terms, levels=1)
    if len(dicts) < 2:  # as Ansible, a single dict is returned unchecked
        return dicts[0] if dicts else {}
    result = dicts[-1]
    for low in reversed(dicts[:-1]):  # Ansible's order, right to left: it decides which of equal lists is kept
        result = _merge_hash(low, result, recursive, list_merge)
    return result


def _dict2items(d: Mapping[str, Any], key_name: str = "key", value_name: str = "value") -> list[dict[str, Any]]:
    if not isinstance(d, Mapping):
        raise TemplateFailure(f"dict2items requires a dictionary, got {type(d).__name__}")
    return [{key_name: k, value_name: v} for k, v in d.items()]


def _items2dict(items: Iterable[Mapping[str, Any]], key_name: str = "key", value_name: str = "value") -> dict:
    return {i[key_name]: i[value_name] for i in items}


def _unique(seq: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for x in seq:
        if x not in out:
            out.append(x)
    return out


def _flags(ignorecase: bool, multiline: bool) -> int:
    return (re.I if ignorecase else 0) | (re.M if multiline else 0)


def _regex_replace(value: Any, pattern: str = "", replacement: str = "", ignorecase: bool = False,
                   multiline: bool = False, count: int = 0) -> str:
    return re.sub(pattern, replacement, str(value), count=count, flags=_flags(ignorecase, multiline))


def _regex_search(value: Any, pattern: str, *groups: str, ignorecase: bool = False,
                  multiline: bool = False) -> Any:
    match = re.search(pattern, str(value), flags=_flags(ignorecase, multiline))
    if match is None:
        return None
    if not groups:
        return match.group(0)
    # Ansible's group references: '\\1' or '\\g<name>'.
    refs = [int(g[1:]) if g[1:].isdigit() else g[3:-1] for g in groups]
    return [match.group(r) for r in refs]


def _regex_findall(value: Any, pattern: str, ignorecase: bool = False, multiline: bool = False) -> list[Any]:
    return re.findall(pattern, str(value), flags=_flags(ignorecase, multiline))


def _flatten(seq: Iterable[Any], levels: int | None = None, skip_nulls: bool = True) -> list[Any]:
    """Ansible's flatten: lists in `seq` spliced, `levels` deep (all by default); None and the strings 'None' and
    'null' are dropped at every depth unless `skip_nulls` is false."""
    out: list[Any] = []
    for x in seq:
        if skip_nulls and x in (None, "None", "null"):
            continue
        if isinstance(x, list | tuple) and (levels is None or levels >= 1):
            out.extend(_flatten(x, None if levels is None else int(levels) - 1, skip_nulls))
        else:
            out.append(x)
    return out


def _dump_yaml(value: Any, **kw: Any) -> str:
    import yaml  # here: most runs never dump YAML, and the library's import costs ~15 ms

    try:
        return yaml.safe_dump(_plain(value), allow_unicode=True, **kw)
    except yaml.YAMLError as e:  # a value YAML cannot represent (a range, a set) fails the task, as in Ansible
        raise TemplateFailure(f"to_yaml failed: {e}") from None


def _to_yaml(value: Any, **kw: Any) -> str:
    return _dump_yaml(value, default_flow_style=kw.pop("default_flow_style", None), **kw)


def _to_nice_yaml(value: Any, indent: int = 4, **kw: Any) -> str:
    return _dump_yaml(value, default_flow_style=False, indent=indent, **kw)


def _from_yaml(value: str) -> Any:
    import yaml

    return yaml.safe_load(value)


def _plain(value: Any) -> Any:
    """Builtin types only, so yaml.safe_dump accepts loaded (LineDict/Unsafe) values; an undefined item fails."""
    if type(value) in _SCALARS:  # exactly: an Unsafe string becomes a str below
        return value
    if isinstance(value, Undefined):
        _defined(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value


def _split(value: str, sep: str | None = None, maxsplit: int = -1) -> list[str]:
    return str(value).split(sep, maxsplit)


def _json_default(value: Any) -> Any:
    if isinstance(value, _ITERATORS):  # a range, say: a list, as in Ansible
        return list(value)
    _defined(value)  # an undefined item fails as such, not as a type JSON does not know
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


FILTERS: dict[str, Any] = {
    "bool": _bool,
    "to_json": lambda v, **kw: json.dumps(v, default=_json_default, **kw),
    "to_nice_json": lambda v, indent=4, **kw: json.dumps(v, indent=indent, sort_keys=True, separators=(",", ": "),
                                                          default=_json_default, **kw),
    "from_json": lambda v: json.loads(v),
    "to_yaml": _to_yaml,
    "to_nice_yaml": _to_nice_yaml,
    "from_yaml": _from_yaml,
    "regex_replace": _regex_replace,
    "regex_search": _regex_search,
    "regex_findall": _regex_findall,
    "b64encode": lambda v, encoding="utf-8": base64.b64encode(str(v).encode(encoding)).decode("ascii"),
    "b64decode": lambda v, encoding="utf-8": base64.b64decode(str(v)).decode(encoding),
    "mandatory": _mandatory,
    "combine": _combine,
    "dict2items": _dict2items,
    "items2dict": _items2dict,
    "unique": _unique,
    "difference": lambda a, b: [x for x in _unique(a) if x not in b],
    "union": lambda a, b: _unique(itertools.chain(a, b)),
    "intersect": lambda a, b: [x for x in _unique(a) if x in b],
    "symmetric_difference": lambda a, b: [x for x in _unique(itertools.chain(a, b)) if (x in a) != (x in b)],
    "flatten": _flatten,
    "ternary": lambda v, yes, no, none=None: (none if v is None and none is not None else (yes if v else no)),
    "basename": posixpath.basename,
    "dirname": posixpath.dirname,
    "quote": lambda v: shlex.quote(str(v)),
    "hash": lambda v, algorithm="sha1": hashlib.new(algorithm, str(v).encode()).hexdigest(),
    "split": _split,
    "type_debug": lambda v: type(v).__name__,
}


# -- tests ---------------------------------------------------------------------------------------------
def _version_key(v: Any) -> list[tuple[int, Any]]:
    # LooseVersion-like: numbers compare numerically, words alphabetically, numbers before words.
    parts = [p for p in re.split(r"(\d+|[a-zA-Z]+|\.)", str(v)) if p and p != "."]
    return [(0, int(p)) if p.isdigit() else (1, p) for p in parts]


_VERSION_OPS = {
    "==": operator.eq, "=": operator.eq, "eq": operator.eq,
    "!=": operator.ne, "<>": operator.ne, "ne": operator.ne,
    "<": operator.lt, "lt": operator.lt, "<=": operator.le, "le": operator.le,
    ">": operator.gt, "gt": operator.gt, ">=": operator.ge, "ge": operator.ge,
}


def _version(value: Any, version: Any, op: str = "eq", strict: bool = False, version_type: str | None = None) -> bool:
    if op not in _VERSION_OPS:
        raise TemplateFailure(f"invalid operator for version test: {op!r}")
    return _VERSION_OPS[op](_version_key(value), _version_key(version))


def _result_test(key: str, *, negate: bool = False):
    def test(result: Any) -> bool:
        if not isinstance(result, Mapping):
            raise TemplateFailure(f"the '{key}' test expects a task result (a dictionary)")
        value = to_bool(result.get(key, False)) or (key == "failed" and to_bool(result.get("unreachable")))
        return not value if negate else value
    return test


TESTS: dict[str, Any] = {
    "version": _version,
    "version_compare": _version,
    "failed": _result_test("failed"),
    "failure": _result_test("failed"),
    "succeeded": _result_test("failed", negate=True),
    "success": _result_test("failed", negate=True),
    "successful": _result_test("failed", negate=True),
    "changed": _result_test("changed"),
    "change": _result_test("changed"),
    "skipped": _result_test("skipped"),
    "skip": _result_test("skipped"),
    "match": lambda v, p, ignorecase=False, multiline=False: re.match(p, str(v), _flags(ignorecase, multiline))
    is not None,
    "search": lambda v, p, ignorecase=False, multiline=False: re.search(p, str(v), _flags(ignorecase, multiline))
    is not None,
    "regex": lambda v, p, ignorecase=False, multiline=False, match_type="search":
    getattr(re, match_type)(p, str(v), _flags(ignorecase, multiline)) is not None,
    "subset": lambda a, b: all(x in b for x in a),
    "superset": lambda a, b: all(x in a for x in b),
    "contains": lambda seq, x: x in seq,
}
