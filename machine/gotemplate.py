"""The subset of Go's text/template that docker-machine's `--format` users write, so their scripts keep working:
fields (`{{.Name}}`, `{{.Driver.IPAddress}}`), `{{if}}`/`{{else}}`/`{{end}}`, `{{range}}`, the functions `json`,
`upper`, `lower`, `len`, `join` and `print`, and the `table` prefix with tab-separated columns.
Written here rather than translated to Jinja2: `ls` is a quick command and Jinja2 costs more to import than `ls`
may take."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from machine import ui
from machine.errors import UsageError

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\S+')


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "json": _json,
    "upper": lambda v: str(v).upper(),
    "lower": lambda v: str(v).lower(),
    "len": len,
    "join": lambda items, sep: str(sep).join(str(i) for i in items),
    "print": lambda *values: "".join(_text(v) for v in values),
}


@dataclass
class _Node:
    """Literal text (`text`), an expression to print (`words`), or a block (`kind` if/range with children)."""

    text: str = ""
    words: list[str] = field(default_factory=list)
    kind: str = ""
    body: list[_Node] = field(default_factory=list)
    otherwise: list[_Node] = field(default_factory=list)


@dataclass
class Template:
    source: str
    nodes: list[_Node]
    table: bool  # docker's `table` prefix: a header row, columns aligned

    def render(self, context: Mapping[str, Any]) -> str:
        return "".join(_render(self.nodes, context, self.source))

    def header(self) -> str:
        """The header row of a table: each column's last field name, upper-cased (`.Driver.IPAddress` → IPADDRESS)."""
        cells = []
        for column in self.source.split("\t"):
            names = re.findall(r"\.(\w+)(?![\w.])", column)
            cells.append(names[-1].upper() if names else column.strip().upper())
        return "\t".join(cells)


def parse(source: str) -> Template:
    """Parse a `--format` template, or raise UsageError naming what is wrong with it."""
    table = source.startswith("table ") or source == "table"
    if table:
        source = source[len("table"):].lstrip()
    source = source.replace("\\t", "\t").replace("\\n", "\n")
    nodes, _ = _parse(_lex(source), source, top=True)
    return Template(source, nodes, table)


def render_rows(template: Template, rows: Sequence[Mapping[str, Any]]) -> str:
    """Every row through the template; a table gets its header and aligned columns."""
    lines = [template.render(row) for row in rows]
    if not template.table:
        return "\n".join(lines)
    return ui.columns([line.split("\t") for line in [template.header(), *lines]])


def _lex(source: str) -> list[tuple[str, str]]:
    """(kind, value) tokens: ("text", literal) or ("action", inside of the braces), with Go's `{{-`/`-}}` trims."""
    tokens: list[tuple[str, str]] = []
    position = 0
    for match in _ACTION.finditer(source):
        text = source[position:match.start()]
        if match.group(1):
            text = text.rstrip()
        tokens.append(("text", text))
        tokens.append(("action", match.group(2)))
        position = match.end()
        if match.group(3):
            while position < len(source) and source[position].isspace():
                position += 1
    tail = source[position:]
    if "{{" in tail:
        raise UsageError(f"template {source!r}: unclosed action (a '{{{{' without '}}}}')")
    tokens.append(("text", tail))
    return tokens


def _parse(tokens: list[tuple[str, str]], source: str, top: bool = False) -> tuple[list[_Node], str]:
    """Nodes up to the closing `end`/`else` of the enclosing block (returned as the second value)."""
    nodes: list[_Node] = []
    while tokens:
        kind, value = tokens.pop(0)
        if kind == "text":
            if value:
                nodes.append(_Node(text=value))
            continue
        words = _TOKEN.findall(value)
        if not words:
            raise UsageError(f"template {source!r}: empty action '{{{{}}}}'")
        if words[0] in ("end", "else"):
            if top:
                raise UsageError(f"template {source!r}: '{{{{{words[0]}}}}}' without an if or range")
            return nodes, words[0]
        if words[0] in ("if", "range"):
            if len(words) == 1:
                raise UsageError(f"template {source!r}: '{{{{{words[0]}}}}}' needs a value ({words[0]} .Name)")
            block = _Node(kind=words[0], words=words[1:])
            block.body, closer = _parse(tokens, source)
            if closer == "else":
                block.otherwise, closer = _parse(tokens, source)
            if closer != "end":
                raise UsageError(f"template {source!r}: '{{{{{words[0]}}}}}' without '{{{{end}}}}'")
            nodes.append(block)
        else:
            nodes.append(_Node(words=words))
    if not top:
        raise UsageError(f"template {source!r}: a block is not closed with '{{{{end}}}}'")
    return nodes, ""


def _render(nodes: list[_Node], dot: Any, source: str) -> list[str]:
    out: list[str] = []
    for node in nodes:
        if node.kind == "if":
            out += _render(node.body if _evaluate(node.words, dot, source) else node.otherwise, dot, source)
        elif node.kind == "range":
            items = _evaluate(node.words, dot, source) or []
            if not isinstance(items, Mapping | list):
                raise UsageError(f"template {source!r}: range over {' '.join(node.words)}, which is neither a "
                                 f"list nor a map")
            for item in items.values() if isinstance(items, Mapping) else items:
                out += _render(node.body, item, source)
            if not items:
                out += _render(node.otherwise, dot, source)
        elif node.words:
            out.append(_text(_evaluate(node.words, dot, source)))
        else:
            out.append(node.text)
    return out


def _evaluate(words: list[str], dot: Any, source: str) -> Any:
    head, *args = words
    if head in _FUNCTIONS:
        values = [_argument(a, dot, source) for a in args]
        try:
            return _FUNCTIONS[head](*values)
        except TypeError:
            raise UsageError(f"template {source!r}: wrong arguments for {head}") from None
    if args:
        raise UsageError(f"template {source!r}: unknown function {head!r} (known: {', '.join(_FUNCTIONS)})")
    return _argument(head, dot, source)


def _argument(word: str, dot: Any, source: str) -> Any:
    if word.startswith('"'):
        try:
            return json.loads(word)
        except json.JSONDecodeError:
            raise UsageError(f"template {source!r}: {word} is not a valid string") from None
    if word == ".":
        return dot
    if not word.startswith("."):
        raise UsageError(f"template {source!r}: {word!r} is neither a field (.Name) nor a string")
    value = dot
    for part in word[1:].split("."):
        if not isinstance(value, Mapping) or part not in value:
            known = ", ".join(f".{k}" for k in value) if isinstance(value, Mapping) else "none"
            raise UsageError(f"template {source!r}: unknown field {word} (known here: {known})")
        value = value[part]
    return value


def _text(value: Any) -> str:
    """A value as Go prints it: booleans lower-case, nothing for nil, maps and lists as JSON."""
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (Mapping, list)):
        return _json(value)
    return str(value)
