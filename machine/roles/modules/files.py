"""Files: copy, template, file, lineinfile. Each probes with one command and changes with at most one more."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

from machine.roles.modules.base import Arg, Module, ModuleFailure, unified_diff
from machine.roles.remote import (
    FileState,
    attrs_script,
    checksum_line,
    parse_mode,
    q,
    refused,
    stat_line,
    write_script,
)
from machine.roles.templating import to_bool

_ATTRS = {
    "mode": Arg(), "owner": Arg(type="str"), "group": Arg(type="str"),
}
# Fetching a file's content (for --diff, or for lineinfile to edit) is capped; past this only checksums are
# compared.
_CONTENT_LIMIT = 256 * 1024
_SECTION = "@@pm-content@@"


def _mode(module: Module) -> int | None:
    try:
        return parse_mode(module.params.get("mode"))
    except ValueError as e:
        raise ModuleFailure(str(e)) from None


def _write(module: Module, path: str, data: bytes, mode: int | None, validate: str | None
           ) -> tuple[int, str, str] | None:
    """Write `data` to `path` atomically (remote.write_script) with the module's owner and group. When `validate`
    refuses the new file, nothing is written and its (exit status, stdout, stderr) are returned."""
    if validate and "%s" not in validate:
        raise ModuleFailure(f"validate must contain %s: {validate}")  # Ansible's words
    try:
        module.sh(write_script(path, mode, module.params["owner"], module.params["group"], validate=validate),
                  stdin=data, what=f"writing {path}")
    except ModuleFailure as e:
        found = refused(e.extra.get("stdout", "")) if validate else None
        if found is None:
            raise
        return found[0], found[1], e.extra.get("stderr", "")
    return None


class _Probe:
    """`path`'s attributes, checksum and (when asked) content, from one command's output. The content comes
    base64-encoded: bytes that are not UTF-8 must come back as they are (a lineinfile writes them back)."""

    def __init__(self, module: Module, path: str, *, content: bool, dir_basename: str = "") -> None:
        known = None if content else module.ctx.known("file", path)
        if known is not None and not (dir_basename and known.state.kind == "directory"):
            self.path, self.state, self.checksum, self.data = path, known.state, known.checksum, None
            return
        # When dest is an existing directory, copy/template write into it under the source's name.
        into_dir = f'[ -d "$p" ] && p="$p"/{q(dir_basename)}; ' if dir_basename else ""
        want_data = f'if [ $t = file ] && [ "$sz" -le {_CONTENT_LIMIT} ]; then echo {_SECTION}; base64 < "$p"; fi' \
            if content else "true"
        out = module.sh(f'p={q(path)}; {into_dir}echo "$p"; {stat_line()}; {checksum_line()}; {want_data}',
                        what="probe").stdout
        head, _, encoded = out.partition(_SECTION + "\n")
        lines = head.split("\n")
        self.path = lines[0]
        self.state = FileState.parse(lines[1])
        self.checksum = lines[2].strip() if len(lines) > 2 else ""
        self.data: bytes | None = base64.b64decode(encoded) if _SECTION in out else None


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
                result["diff"] = self._diff(probe.data, data, dest, exists=cur.exists)
            if not self.ctx.check:
                invalid = _write(self, dest, data, mode, p["validate"])
                if invalid is not None:  # Ansible's words and keys
                    status, out, err = invalid
                    raise ModuleFailure("failed to validate", exit_status=status, stdout=out, stderr=err,
                                        stdout_lines=out.splitlines(), stderr_lines=err.splitlines())
            return result
        return self.ensure_attributes(dest, cur, mode, result)

    @staticmethod
    def _diff(before: bytes | None, data: bytes, dest: str, *, exists: bool) -> str:
        """A text diff, or a line saying that the file differs when either side is not UTF-8 text or the file
        was too large to fetch."""
        if not exists:
            before = b""
        if before is not None:  # None: too large to fetch
            with contextlib.suppress(UnicodeDecodeError):
                return unified_diff(before.decode(), data.decode(), dest)
        return f"binary file {dest} differs\n"


class Copy(_Content):
    names = ("copy",)
    args: ClassVar[dict[str, Arg]] = {"dest": Arg(required=True, type="str"), "src": Arg(type="str"), "content": Arg(),
            "force": Arg(default=True, type="bool"), "validate": Arg(type="str"), **_ATTRS}

    def content(self) -> bytes:
        p = self.params
        if p["src"] is None and p["content"] is None:  # Ansible's words, here and below
            raise ModuleFailure("src (or content) is required")
        if p["src"] is not None and p["content"] is not None:
            raise ModuleFailure("src and content are mutually exclusive")
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
            "src": Arg(type="str"), "force": Arg(default=False, type="bool"), "follow": Arg(default=True, type="bool"),
            "modification_time": Arg(type="str"), "access_time": Arg(type="str"), **_ATTRS}

    reads = ("file", "path")

    @classmethod
    def reading(cls, args: Mapping[str, Any]) -> str | None:
        if args.get("state") == "link" and not to_bool(args.get("force")):
            return None  # it probes for itself, looking for its src too
        return super().reading(args)

    def run(self) -> dict[str, Any]:
        p = self.params
        path, mode = p["path"], _mode(self)
        # As Ansible, a link to a src that does not exist is refused unless forced (even when it is there already).
        cur, real, target, missing_src = self._probe(path, p["src"] if p["state"] == "link" and not p["force"]
                                                     else None)
        # Without a state Ansible keeps the current kind (and only manages attributes).
        state = p["state"] or (cur.kind if cur.kind in ("file", "directory", "link") else "file")
        if state == "absent":
            return self._finish(path, [f"rm -rf -- {q(path)}"] if cur.exists else [], ["removed"] if cur.exists else [])
        if state == "link":
            if missing_src is not None:
                raise ModuleFailure(f"src file does not exist, use 'force=yes' if you really want to create the link: "
                                    f"{missing_src}", path=path, src=p["src"])
            return self._link(path, cur, real, target, mode)
        if target is not None:  # follow: a link's target is what gets checked, created and changed
            path, cur = real, target
        steps: list[str] = []
        changes: list[str] = []
        after = cur
        if state == "file" and cur.kind not in ("file", "other"):  # a fifo or a device is a file to Ansible
            raise ModuleFailure(f"file ({path}) is {cur.kind}, cannot continue")  # absent too, as Ansible says
        if state == "directory" and cur.kind not in ("directory", "absent"):
            raise ModuleFailure(f"{path} already exists as a {cur.kind}")
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
        attrs, attr_changes = attrs_script(path, after, mode, p["owner"], p["group"])
        if attrs:
            steps.append(attrs)
            changes += attr_changes
        return self._finish(path, steps, changes)

    def _probe(self, path: str, src: str | None = None) -> tuple[FileState, str, FileState | None, str | None]:
        """`path`'s state and, when it is a link and `follow` is set, the path and state of what it resolves to
        (as Ansible's os.path.realpath: a missing target is absent). Only a link costs the resolving process.
        Last, when `src` is given: None if it exists where Ansible's state=link looks for it (relative to the
        link's directory, or to `path` itself when that is a directory), else that place."""
        known = self.ctx.known("file", path) if src is None else None
        if known is not None:  # read ahead: never a link
            return known.state, path, None, None
        look = ""
        if src is not None:
            in_dir, beside = posixpath.join(path, src), posixpath.join(posixpath.dirname(path), src)
            look = (f'; if [ $t = directory ]; then a={q(in_dir)}; else a={q(beside)}; fi; '
                    '[ -e "$a" ] && echo || echo "$a"')
        follow = f'; if [ $t = link ]; then p=$(readlink -m -- "$p"); echo "$p"; {stat_line()}; fi' \
            if self.params["follow"] else ""
        lines = self.sh(f"p={q(path)}; {stat_line()}{look}{follow}", what="probe").stdout.split("\n")
        state = FileState.parse(lines.pop(0))
        missing = (lines.pop(0) or None) if src is not None else None
        if len(lines) < 2 or not lines[1]:
            return state, path, None, missing
        return state, lines[0], FileState.parse(lines[1]), missing

    def _link(self, path: str, cur: FileState, real: str, target: FileState | None, mode: int | None
              ) -> dict[str, Any]:
        """state=link: the link itself is made or replaced; with `follow`, attributes go to what it points at."""
        p = self.params
        src = p["src"] or (cur.target if cur.kind == "link" else None)  # no src: keep the link as it is
        if not src:
            raise ModuleFailure("state=link needs src")
        steps: list[str] = []
        changes: list[str] = []
        if cur.kind != "link" or cur.target != src:
            if cur.kind == "directory" or (cur.kind in ("file", "other") and not p["force"]):
                # Ansible's words (a fifo or a device is a file to it). Unlike Ansible, a forced link does not
                # replace an empty directory either: ln would make the link inside it.
                kind = "directory" if cur.kind == "directory" else "file"
                raise ModuleFailure(f"refusing to convert from {kind} to symlink for {path}", path=path)
            steps.append(f"ln -sfn -- {q(src)} {q(path)}")
            changes.append(f"link -> {src}")
            if p["follow"]:
                # What the new link points at is known only once it is made: its attributes are set without
                # comparing them (the task changed anyway); a missing target has none, as in Ansible.
                attrs, _ = attrs_script(path, FileState("absent"), mode, p["owner"], p["group"], follow=True)
                if attrs:
                    steps.append(f"if [ -e {q(path)} ]; then {attrs}; fi")
                return self._finish(path, steps, changes)
        if target is not None:  # follow: the link is right, its target gets the attributes
            if not target.exists:
                return self._finish(path, steps, changes)
            attrs, attr_changes = attrs_script(real, target, mode, p["owner"], p["group"])
        else:
            attrs, attr_changes = attrs_script(path, replace(cur, kind="link", target=src), mode, p["owner"],
                                               p["group"])
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
        if probe.state.exists and probe.data is None:
            raise ModuleFailure(f"{p['path']} is larger than {_CONTENT_LIMIT} bytes")
        if not probe.state.exists and p["state"] == "present" and not p["create"]:
            raise ModuleFailure(f"Destination {p['path']} does not exist !")
        if not probe.state.exists and p["state"] == "absent":
            return {"changed": False, "msg": "file not present"}
        # Lines are edited as bytes, split after each newline only, as Ansible's lineinfile does (readlines()):
        # lines it does not touch stay byte for byte, whatever their encoding.
        before = probe.data or b""
        lines = io.BytesIO(before).readlines()
        if p["state"] == "present":
            if p["line"] is None:
                raise ModuleFailure("state=present needs line")
            new_lines, msg = self._present(lines)
        else:
            new_lines, msg = self._absent(lines)
        after = b"".join(new_lines)
        result: dict[str, Any] = {"changed": False}
        mode = _mode(self)
        if after != before or (not probe.state.exists and p["state"] == "present"):
            result.update(changed=True, msg=msg)
            if self.ctx.diff:
                result["diff"] = unified_diff(before.decode(errors="replace"), after.decode(errors="replace"),
                                              p["path"])
            if not self.ctx.check:
                invalid = _write(self, p["path"], after, mode, p["validate"])
                if invalid is not None:  # Ansible's words
                    raise ModuleFailure(f"failed to validate: rc:{invalid[0]} error:{invalid[2]}")
            return result
        return self.ensure_attributes(p["path"], probe.state, mode, result)

    @staticmethod
    def _bytes(text: str) -> bytes:
        return text.encode("utf-8", "surrogateescape")

    def _present(self, lines: list[bytes]) -> tuple[list[bytes], str]:
        """`present` with Ansible's lineinfile semantics, on the file's lines as bytes: what a line regexp or
        search_string finds is replaced, else the line is added where the anchors say (unless it is there)."""
        p = self.params
        line = self._bytes(p["line"])
        after_anchor, before_anchor = p["insertafter"], p["insertbefore"]
        anchor = after_anchor if after_anchor not in (None, "BOF", "EOF") else (
            before_anchor if before_anchor not in (None, "BOF") else None)
        anchor_re = re.compile(self._bytes(anchor)) if anchor is not None else None
        found, insert_at, match = -1, -1, None
        # 1. the line regexp or search_string finds (the last, or the first with firstmatch)
        if p["regexp"] is not None or p["search_string"] is not None:
            regexp = re.compile(self._bytes(p["regexp"])) if p["regexp"] is not None else None
            for i, cur in enumerate(lines):
                m = regexp.search(cur) if regexp is not None else self._bytes(p["search_string"]) in cur
                if m:
                    found, match = i, m
                    if p["firstmatch"]:
                        break
        # 2. nothing found: the line itself, or where the anchor says to insert it
        if not match:
            for i, cur in enumerate(lines):
                if line == cur.rstrip(b"\r\n"):
                    found = i
                elif anchor_re is not None and anchor_re.search(cur):
                    insert_at = i + 1 if after_anchor else i
                    if p["firstmatch"]:
                        break
        lines = [*lines]
        if found != -1:
            new = match.expand(line) if p["backrefs"] and isinstance(match, re.Match) else line
            new += b"" if new.endswith(b"\n") else b"\n"
            if lines[found] == new:
                return lines, ""
            lines[found] = new
            return lines, "line replaced"
        if p["backrefs"]:  # nothing matched to fill in the backreferences: do nothing, as Ansible
            return lines, ""
        if "BOF" in (before_anchor, after_anchor):
            return [line + b"\n", *lines], "line added"
        if after_anchor == "EOF" or insert_at == -1:
            if lines and lines[-1][-1:] not in (b"\n", b"\r"):
                lines.append(b"\n")
            return [*lines, line + b"\n"], "line added"
        # After an anchor: not again where it already is (next to the anchor, or the anchor at the end).
        if after_anchor and (lines[min(insert_at, len(lines) - 1)]).rstrip(b"\r\n") == line:
            return lines, ""
        lines.insert(insert_at, line + b"\n")
        return lines, "line added"

    def _absent(self, lines: list[bytes]) -> tuple[list[bytes], str]:
        p = self.params
        if p["regexp"] is None and p["search_string"] is None and p["line"] is None:
            raise ModuleFailure("state=absent needs one of regexp, search_string or line")
        regexp = re.compile(self._bytes(p["regexp"])) if p["regexp"] is not None else None

        def matches(cur: bytes) -> bool:
            if regexp is not None:
                return bool(regexp.search(cur))
            if p["search_string"] is not None:
                return self._bytes(p["search_string"]) in cur
            return self._bytes(p["line"]) == cur.rstrip(b"\r\n")

        kept = [x for x in lines if not matches(x)]
        removed = len(lines) - len(kept)
        return kept, f"{removed} line(s) removed" if removed else ""
