"""Files: copy, template, file, lineinfile. Each probes with one command and changes with at most one more."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import replace
from typing import Any, ClassVar

from machine.roles.modules.base import Arg, Module, ModuleFailure, unified_diff
from machine.roles.remote import FileState, attrs_script, checksum_line, parse_mode, q, stat_line, write_script

_ATTRS = {
    "mode": Arg(), "owner": Arg(type="str"), "group": Arg(type="str"),
}
# Fetching a file's text for --diff is capped; past this only checksums are compared.
_DIFF_LIMIT = 256 * 1024
_SECTION = "@@pm-content@@"


def _mode(module: Module) -> int | None:
    try:
        return parse_mode(module.params.get("mode"))
    except ValueError as e:
        raise ModuleFailure(str(e)) from None


class _Probe:
    """`path`'s attributes, checksum and (when asked) text, from one command's output."""

    def __init__(self, module: Module, path: str, *, content: bool, dir_basename: str = "") -> None:
        known = None if content else module.ctx.known("file", path)
        if known is not None and not (dir_basename and known.state.kind == "directory"):
            self.path, self.state, self.checksum, self.text = path, known.state, known.checksum, None
            return
        # When dest is an existing directory, copy/template write into it under the source's name.
        into_dir = f'[ -d "$p" ] && p="$p"/{q(dir_basename)}; ' if dir_basename else ""
        want_text = f'if [ $t = file ] && [ "$sz" -le {_DIFF_LIMIT} ]; then echo {_SECTION}; cat "$p"; fi' \
            if content else "true"
        out = module.sh(f'p={q(path)}; {into_dir}echo "$p"; {stat_line()}; {checksum_line()}; {want_text}',
                        what="probe").stdout
        head, _, text = out.partition(_SECTION + "\n")
        lines = head.split("\n")
        self.path = lines[0]
        self.state = FileState.parse(lines[1])
        self.checksum = lines[2].strip() if len(lines) > 2 else ""
        self.text: str | None = text if _SECTION in out else None


class _Content(Module):
    """Put bytes at `dest` with attributes; copy and template only differ in where the bytes come from."""

    reads = ("file", "dest")

    def content(self) -> bytes:
        raise NotImplementedError

    def source_name(self) -> str:
        return ""

    def run(self) -> dict[str, Any]:
        p = self.params
        data = self.content()
        mode = _mode(self)
        probe = _Probe(self, p["dest"], content=self.ctx.diff, dir_basename=self.source_name())
        dest, cur = probe.path, probe.state
        if cur.kind == "directory":
            raise ModuleFailure(f"destination {dest} is a directory")
        checksum = hashlib.sha256(data).hexdigest()
        write = not cur.exists or (probe.checksum != checksum and p.get("force", True))
        result: dict[str, Any] = {"dest": dest, "checksum": checksum, "changed": False}
        if write:
            result["changed"] = True
            if self.ctx.diff:
                result["diff"] = self._diff(probe.text or "", data, dest, binary=cur.exists and probe.text is None)
            if not self.ctx.check:
                script = write_script(dest, mode, p["owner"], p["group"],
                                      validate=p.get("validate"))
                self.sh(script, stdin=data, what=f"writing {dest}")
            return result
        return self.ensure_attributes(dest, cur, mode, result)

    @staticmethod
    def _diff(before: str, data: bytes, dest: str, *, binary: bool) -> str:
        try:
            after = data.decode()
        except UnicodeDecodeError:
            binary = True
        if binary:
            return f"binary file {dest} differs\n"
        return unified_diff(before, after, dest)


class Copy(_Content):
    names = ("copy",)
    args: ClassVar[dict[str, Arg]] = {"dest": Arg(required=True, type="str"), "src": Arg(type="str"), "content": Arg(),
            "force": Arg(default=True, type="bool"), "validate": Arg(type="str"), **_ATTRS}

    def content(self) -> bytes:
        p = self.params
        if (p["src"] is None) == (p["content"] is None):
            raise ModuleFailure("copy needs exactly one of src or content")
        if p["content"] is not None:
            c = p["content"]
            # A mapping or a list (`content: "{{ cfg }}"`) is written as JSON, as Ansible's copy does.
            return (json.dumps(c) if isinstance(c, dict | list) else str(c)).encode()
        path = self.find_source("files", p["src"])
        if path.is_dir():
            raise ModuleFailure(f"src {p['src']} is a directory; copying directories is not supported")
        return path.read_bytes()

    def source_name(self) -> str:
        return posixpath.basename(self.params["src"]) if self.params["src"] else ""


class Template(_Content):
    names = ("template",)
    args: ClassVar[dict[str, Arg]] = {"src": Arg(required=True, type="str"), "dest": Arg(required=True, type="str"),
            "force": Arg(default=True, type="bool"), "validate": Arg(type="str"), **_ATTRS}

    def content(self) -> bytes:
        path = self.find_source("templates", self.params["src"])
        variables = self.ctx.vars.child({"template_path": str(path), "template_fullpath": str(path),
                                         "template_destpath": self.params["dest"]})
        return self.ctx.templar.render_file(path, variables).encode()

    def source_name(self) -> str:
        return posixpath.basename(self.params["src"]).removesuffix(".j2")


class File(Module):
    names = ("file",)
    args: ClassVar[dict[str, Arg]] = {"path": Arg(required=True, aliases=("dest", "name"), type="str"),
            "state": Arg(choices=("file", "directory", "absent", "touch", "link")),
            "src": Arg(type="str"), "force": Arg(default=False, type="bool"),
            "modification_time": Arg(type="str"), "access_time": Arg(type="str"), **_ATTRS}

    reads = ("file", "path")

    def run(self) -> dict[str, Any]:
        p = self.params
        path, mode = p["path"], _mode(self)
        known = self.ctx.known("file", path)
        cur = known.state if known else FileState.parse(self.sh(f"p={q(path)}; {stat_line()}", what="probe").stdout)
        # Without a state Ansible keeps the current kind (and only manages attributes).
        state = p["state"] or (cur.kind if cur.kind in ("file", "directory") else "file")
        steps: list[str] = []
        changes: list[str] = []
        after = cur
        if state == "absent":
            if cur.exists:
                steps.append(f"rm -rf -- {q(path)}")
                changes.append("removed")
            return self._finish(path, steps, changes)
        if state == "file" and not cur.exists:
            raise ModuleFailure(f"file {path} does not exist (use state=touch to create it)")
        if state == "directory" and cur.kind not in ("directory", "absent"):
            raise ModuleFailure(f"{path} exists and is not a directory")
        if state == "directory" and not cur.exists:
            steps.append(f"mkdir -p -- {q(path)}")
            changes.append("directory created")
            after = FileState("directory")
        elif state == "touch":
            preserve = p["modification_time"] == "preserve" and p["access_time"] == "preserve"
            if not cur.exists or not preserve:
                steps.append(f"touch -- {q(path)}")
                changes.append("touched" if cur.exists else "file created")
                after = cur if cur.exists else FileState("file")
        elif state == "link":
            if not p["src"]:
                raise ModuleFailure("state=link needs src")
            if cur.kind != "link" or cur.target != p["src"]:
                if cur.kind == "directory" or (cur.kind == "file" and not p["force"]):
                    raise ModuleFailure(f"{path} exists and is not a link (use force=yes to replace a file)")
                steps.append(f"ln -sfn -- {q(p['src'])} {q(path)}")
                changes.append(f"link -> {p['src']}")
                after = replace(cur, kind="link", target=p["src"])
        attrs, attr_changes = attrs_script(path, after, mode, p["owner"], p["group"])
        if attrs:
            steps.append(attrs)
            changes += attr_changes
        return self._finish(path, steps, changes)

    def _finish(self, path: str, steps: list[str], changes: list[str]) -> dict[str, Any]:
        if steps and not self.ctx.check:
            self.sh(" && ".join(steps), what=f"changing {path}")
        return {"path": path, "changed": bool(steps), **({"msg": ", ".join(changes)} if changes else {})}


class LineInFile(Module):
    names = ("lineinfile",)
    args: ClassVar[dict[str, Arg]] = {"path": Arg(required=True, aliases=("dest", "destfile", "name"), type="str"),
            "regexp": Arg(aliases=("regex",), type="str"), "search_string": Arg(type="str"),
            "line": Arg(aliases=("value",), type="str"),
            "state": Arg(default="present", choices=("present", "absent")),
            "create": Arg(default=False, type="bool"), "backrefs": Arg(default=False, type="bool"),
            "insertafter": Arg(type="str"), "insertbefore": Arg(type="str"),
            "firstmatch": Arg(default=False, type="bool"), "validate": Arg(type="str"), **_ATTRS}

    def run(self) -> dict[str, Any]:
        p = self.params
        probe = _Probe(self, p["path"], content=True)
        if probe.state.exists and probe.state.kind != "file":
            raise ModuleFailure(f"{p['path']} is not a regular file")
        if probe.state.exists and probe.text is None:
            raise ModuleFailure(f"{p['path']} is larger than {_DIFF_LIMIT} bytes")
        if not probe.state.exists and p["state"] == "present" and not p["create"]:
            raise ModuleFailure(f"Destination {p['path']} does not exist !")
        before = probe.text or ""
        lines = before.splitlines(keepends=True)
        if p["state"] == "present":
            if p["line"] is None:
                raise ModuleFailure("state=present needs line")
            new_lines, msg = self._present(lines)
        else:
            new_lines, msg = self._absent(lines)
        after = "".join(new_lines)
        result: dict[str, Any] = {"changed": False}
        mode = _mode(self)
        if after != before or (not probe.state.exists and p["state"] == "present"):
            result.update(changed=True, msg=msg)
            if self.ctx.diff:
                result["diff"] = unified_diff(before, after, p["path"])
            if not self.ctx.check:
                self.sh(write_script(p["path"], mode, p["owner"], p["group"], validate=p["validate"]),
                        stdin=after.encode(), what=f"writing {p['path']}")
            return result
        script, changes = attrs_script(p["path"], probe.state, mode, p["owner"], p["group"])
        if script:
            result.update(changed=True, msg=", ".join(changes))
            if not self.ctx.check:
                self.sh(script, what=f"setting attributes of {p['path']}")
        return result

    def _matches(self, text: str) -> re.Match[str] | bool | None:
        p = self.params
        if p["regexp"] is not None:
            return re.search(p["regexp"], text)
        if p["search_string"] is not None:
            return p["search_string"] in text
        return text == p["line"]

    def _present(self, lines: list[str]) -> tuple[list[str], str]:
        p = self.params
        found, match = -1, None
        anchor = p["insertafter"] or p["insertbefore"]
        anchor_re = re.compile(anchor) if anchor not in (None, "EOF", "BOF") else None
        insert_at = -1
        for i, raw in enumerate(lines):
            text = raw.rstrip("\r\n")
            m = self._matches(text)
            if m:
                found, match = i, m
                if p["firstmatch"]:
                    break
            elif anchor_re is not None and anchor_re.search(text) and (insert_at == -1 or not p["firstmatch"]):
                insert_at = i + 1 if p["insertafter"] else i
        line = p["line"]
        if found >= 0:
            if p["backrefs"] and isinstance(match, re.Match):
                line = match.expand(line)
            if lines[found].rstrip("\r\n") == line:
                return lines, ""
            lines = [*lines]
            lines[found] = line + "\n"
            return lines, "line replaced"
        if p["backrefs"] or any(x.rstrip("\r\n") == line for x in lines):
            return lines, ""
        lines = [*lines]
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        if p["insertbefore"] == "BOF":
            insert_at = 0
        if insert_at == -1:
            insert_at = len(lines)
        lines.insert(insert_at, line + "\n")
        return lines, "line added"

    def _absent(self, lines: list[str]) -> tuple[list[str], str]:
        p = self.params
        if p["regexp"] is None and p["search_string"] is None and p["line"] is None:
            raise ModuleFailure("state=absent needs one of regexp, search_string or line")
        kept = [x for x in lines if not self._matches(x.rstrip("\r\n"))]
        removed = len(lines) - len(kept)
        return kept, f"{removed} line(s) removed" if removed else ""
