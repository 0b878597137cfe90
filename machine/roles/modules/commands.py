"""command and shell: always a change when they run; `creates`/`removes` make them idempotent."""

from __future__ import annotations

import re
import shlex
from datetime import datetime
from typing import Any, ClassVar

from machine.roles.modules.base import Arg, Module, ModuleFailure
from machine.roles.remote import home_path, q, tilde_prefix

_SKIP = "@@pm-skip@@"
_NOT_RUN = "@@pm-not-run@@"
# Ansible's command module execs the program itself: one that cannot be run fails with the errno (2: not found,
# 13: not executable), not as a command that ran (sh's 127 and 126). So the program is looked for as execvp does,
# on the PATH unless the name has a slash, before it runs.
_EXEC = (
    "__pm_exec() {\n"
    '  case $1 in */*) __pm_p=$1 ;; *) __pm_p=; IFS=:; for __pm_d in $PATH; do __pm_d=${__pm_d:-.}; '
    'if [ -f "$__pm_d/$1" ] && [ -x "$__pm_d/$1" ]; then __pm_p=$__pm_d/$1; break; fi; done; unset IFS ;; esac\n'
    f'  if [ -z "$__pm_p" ] || [ ! -e "$__pm_p" ]; then echo "{_NOT_RUN} 2"; exit 0; fi\n'
    f'  if [ -d "$__pm_p" ] || [ ! -x "$__pm_p" ]; then echo "{_NOT_RUN} 13"; exit 0; fi\n'
    '  "$@"\n'
    "}\n"
)
_WOULD_RUN = "Command would have run if not in check mode"
_VAR = re.compile(r"\$(\w+|\{[^}]*\})")  # what Python's os.path.expandvars replaces
_SH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Options Ansible recognises inside a free-form command line (`creates=/x cmd args`).
_INLINE = re.compile(r"""(?:^|\s)(creates|removes|chdir|executable|stdin)=("[^"]*"|'[^']*'|\S+)""")


class Command(Module):
    names = ("command",)
    free_form = True
    args: ClassVar[dict[str, Arg]] = {
        "_raw_params": Arg(type="str"), "cmd": Arg(type="str"), "argv": Arg(type="list"),
        "chdir": Arg(type="str"), "creates": Arg(type="str"), "removes": Arg(type="str"),
        "stdin": Arg(type="str"), "stdin_add_newline": Arg(default=True, type="bool"),
        "strip_empty_ends": Arg(default=True, type="bool"), "expand_argument_vars": Arg(default=True, type="bool"),
    }

    @classmethod
    def parse_free_form(cls, text: str) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for key, value in _INLINE.findall(text):
            args[key] = value[1:-1] if value[:1] in "\"'" else value
        rest = _INLINE.sub("", text).strip()
        if rest:
            args["_raw_params"] = rest
        return args

    def _words(self) -> list[str]:
        p = self.params
        raw = p["cmd"] or p["_raw_params"]
        if p.get("argv"):
            return [str(a) for a in p["argv"]]
        if not raw:
            raise ModuleFailure("no command given")
        return shlex.split(raw)

    def command_line(self) -> str:
        # command runs without a shell: its words are quoted so the remote shell passes them through, but for
        # what Ansible expands in them on the target (expand_argument_vars).
        words = self._words()
        setup, line = expanded(words) if self.params["expand_argument_vars"] else ("", shlex.join(words))
        return f"{_EXEC}{setup}__pm_exec {line}"

    def described(self) -> str | list[str]:
        """The command as the result's `cmd` gives it, as Ansible's: its words as written (not the script that
        expands them)."""
        return self._words()

    def run(self) -> dict[str, Any]:
        p = self.params
        cmd = self.command_line()
        # As in Ansible, the command module first changes to `chdir`, then looks for `creates`/`removes` there.
        chdir = f"cd {home_path(p['chdir'])} || exit 1\n" if p["chdir"] else ""
        guard = ""
        if p["creates"]:
            guard += f"if {_matches(p['creates'])}; then echo {_SKIP} creates; exit 0; fi\n"
        if p["removes"]:
            guard += f"if ! {_matches(p['removes'])}; then echo {_SKIP} removes; exit 0; fi\n"
        if guard:
            guard += "set --\n"  # the script (a shell task's) starts without positional parameters, as always
        if self.ctx.check:
            if not guard:  # as Ansible: skipped, unless creates/removes can tell
                return self._result(msg=_WOULD_RUN, skipped=True)
            option = self._skipped_by(self.sh(chdir + guard + "true", what="probe").stdout)
            return self._guarded(option, "Would") if option else self._result(changed=True, msg=_WOULD_RUN)
        stdin = None
        if p["stdin"] is not None:
            stdin = (p["stdin"] + ("\n" if p["stdin_add_newline"] else "")).encode()
        start = datetime.now()  # timed here, around the command's round trip (Ansible times it on the target)
        res = self.ctx.run(chdir + guard + cmd, stdin=stdin)
        end = datetime.now()
        option = self._skipped_by(res.stdout) if guard else None
        if option:
            return self._guarded(option, "Did")
        errno = self._not_run(res.stdout)
        if errno is not None:  # Ansible's result for a program it could not exec
            return self._result(rc=errno, msg="Error executing command.", failed=True, cmd=shlex.join(self._words()))
        strip = (lambda s: s.rstrip("\r\n")) if p["strip_empty_ends"] else (lambda s: s)
        result = self._result(changed=True, rc=res.rc, stdout=strip(res.stdout), stderr=strip(res.stderr),
                              start=str(start), end=str(end), delta=str(end - start))
        if res.rc != 0:
            result.update(failed=True, msg="non-zero return code")
        return result

    def _result(self, *, changed: bool = False, rc: int = 0, stdout: str = "", stderr: str = "", msg: str = "",
                **more: Any) -> dict[str, Any]:
        """A result with the keys of Ansible's command module (start, end and delta None when nothing ran)."""
        return {"changed": changed, "cmd": self.described(), "rc": rc, "stdout": stdout, "stderr": stderr,
                "stdout_lines": stdout.splitlines(), "stderr_lines": stderr.splitlines(), "msg": msg,
                "start": None, "end": None, "delta": None, **more}

    def _guarded(self, option: str, verb: str) -> dict[str, Any]:
        """The result of a command that `option` (creates or removes) kept from running, worded as Ansible's."""
        path = self.params[option]
        state = "exists" if option == "creates" else "does not exist"
        return self._result(stdout=f"skipped, since {path} {state}",
                            msg=f"{verb} not run command since '{path}' {state}")


    @staticmethod
    def _not_run(output: str) -> int | None:
        """The errno of a program that could not be run, named by the command's output (Command only)."""
        mark, _, errno = output.strip().partition(" ")
        return int(errno) if mark == _NOT_RUN and errno.isdigit() else None

    @staticmethod
    def _skipped_by(output: str) -> str | None:
        """The option (creates or removes) whose guard kept the command from running, named by its output."""
        return {f"{_SKIP} creates": "creates", f"{_SKIP} removes": "removes"}.get(output.strip())


def expanded(words: list[str]) -> tuple[str, str]:
    """The command line of `words` for the target's shell, each word expanded there as Ansible's command module
    expands an argument (os.path.expandvars, then expanduser): `$NAME` and `${NAME}` of a variable that is set, a
    leading `~` or `~user`; everything else, an unset variable's name included, stays as written.

    A variable's expansion is first assigned (an assignment is never split, globbed, and keeps the text as written
    when the variable is unset), then used quoted in the word: returns (those assignments, the line).
    """
    assignments, line = [], []
    for word in words:
        tilde, rest = tilde_prefix(word)
        parts, at = [tilde], 0
        for var in _VAR.finditer(rest):
            parts.append(q(rest[at:var.start()]) if var.start() > at else "")
            name = var.group(1)[1:-1] if var.group(1).startswith("{") else var.group(1)  # as expandvars reads it
            if _SH_NAME.fullmatch(name):
                held = f"__pm_arg{len(assignments)}"
                assignments.append(f"{held}=${{{name}-{q(var.group())}}}\n")
                parts.append(f'"${held}"')
            else:
                parts.append(q(var.group()))
            at = var.end()
        parts.append(q(rest[at:]) if at < len(rest) or not "".join(parts) else "")
        line.append("".join(parts))
    return "".join(assignments), " ".join(line)


def _matches(pattern: str) -> str:
    """A shell condition true when the glob `pattern` (`~` expanded) matches a name, as Ansible's glob.glob: the
    pattern is expanded from a variable, with IFS empty so that its spaces do not split it. No process."""
    return (f"{{ g={home_path(pattern)}; IFS=; set -- $g; unset IFS; "
            '[ -e "$1" ] || [ -L "$1" ]; }')


class Shell(Command):
    names = ("shell",)
    args: ClassVar[dict[str, Arg]] = {**{k: v for k, v in Command.args.items() if k != "argv"},
                                      "executable": Arg(type="str")}

    def command_line(self) -> str:
        raw = self.params["cmd"] or self.params["_raw_params"]
        if not raw:
            raise ModuleFailure("no command given")
        if self.params["executable"]:
            return f"exec {q(self.params['executable'])} -c {q(raw)}"
        return raw

    def described(self) -> str | list[str]:
        return str(self.params["cmd"] or self.params["_raw_params"])
