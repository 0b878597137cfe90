"""YAML loading that remembers where every mapping (and each of its keys) starts, for file:line errors.

The YAML library is imported by the functions that parse: a command whose roles were kept loaded
(machine.roles.loader.keep_plays) never needs it."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

from machine.errors import MachineError


class RoleError(MachineError):
    """A role cannot be loaded or a task cannot run; the message starts with `file:line:` when known."""


class Unsafe(str):
    """A string tagged `!unsafe`: used as is, never templated (as in Ansible)."""


class LineDict(dict):
    """A mapping that knows the file and line it was read from, and the line of each key."""

    file: str
    line: int
    key_lines: dict[str, int]

    def where(self, key: str | None = None) -> str:
        line = self.key_lines.get(key, self.line) if key is not None else self.line
        return f"{self.file}:{line}"


def _loader(display: str) -> type:
    import yaml

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> LineDict:
            self.flatten_mapping(node)
            data = LineDict()
            data.file = display
            data.line = node.start_mark.line + 1
            data.key_lines = {}
            for key_node, value_node in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):  # `? [a, b]`: a valid YAML key that no dict can hold
                    raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar",
                                                            key_node.start_mark)
                data[key] = self.construct_object(value_node, deep=True)
                data.key_lines[key] = key_node.start_mark.line + 1
            return data

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, Loader.construct_mapping)
    Loader.add_constructor("!unsafe", lambda loader, node: Unsafe(loader.construct_scalar(node)))
    return Loader


def load_yaml(path: Path, display: str) -> Any:
    """Parse `path`; `display` is the name used in messages (e.g. `roles/x/tasks/main.yml`)."""
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise RoleError(f"{display}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise RoleError(f"{display}: not UTF-8 text (byte {e.start})") from None
    try:
        return yaml.load(text, Loader=_loader(display))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise RoleError(f"{display}{line}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise RoleError(f"{display}: YAML error: {e}") from None
