"""The target host as the modules see it: POSIX shell scripts run through the connection, with become."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from machine.become import as_user
from machine.ssh import Connection

q = shlex.quote


class Runner(Protocol):
    """What the engine needs of a connection (machine.ssh.Connection or a test double)."""

    endpoint: Any

    def run(self, command: str, *, stdin: bytes | None = None, check: bool = False,
            timeout: float | None = None) -> Any: ...

    def reconnect(self, timeout: float) -> None: ...


@dataclass(frozen=True)
class Become:
    enabled: bool = False
    user: str = "root"


class Remote:
    """Runs scripts as `sh -c`, so the login shell of the remote user does not matter.

    Over a real connection the scripts of each target user run in one shell kept running (machine.sshshell):
    one sudo for the whole play instead of one per command, and no channel per command."""

    def __init__(self, conn: Runner) -> None:
        self.conn = conn
        self.user = getattr(conn.endpoint, "user", "root")
        self.shells = isinstance(conn, Connection)  # a test double runs each command on its own
        # What read_ahead found, by the user that read it and (kind, name): true until the next command runs.
        self._known: dict[tuple[Become, str, str], Any] = {}

    def command(self, script: str, become: Become = Become(), env: Mapping[str, Any] | None = None) -> str:
        return self._as(become, ["env", _C_LOCALE, *_pairs(env), "sh", "-c", script])

    def _as(self, become: Become, argv: list[str]) -> str:
        """`argv` as a command line run as the user `become` names (through sudo, or su from root)."""
        target = become.user if become.enabled else self.user
        if target == self.user:
            return shlex.join(argv)
        if self.user != "root":
            return shlex.join(as_user(target, argv))
        return shlex.join(["su", "-s", "/bin/sh", target, "-c", shlex.join(argv)])

    def known(self, kind: str, name: str, become: Become) -> Any:
        """What read_ahead found of the `kind` ("file": a KnownFile, "unit": its properties) named `name`, if no
        command ran since (any command may have changed it); None otherwise."""
        return self._known.get((become, kind, name))

    def holds_reads(self) -> bool:
        """Whether what the last read_ahead found is still known (no command ran since)."""
        return bool(self._known)

    def read_ahead(self, kind: str, names: Sequence[str], become: Become) -> None:
        """Read what the modules of several tasks in a row will look at first, with one command whatever their
        number: the files of file tasks, the units of service tasks. Kept until the next command runs."""
        read = {"file": self._read_files, "unit": self._read_units}[kind]
        found = read(list(dict.fromkeys(names)), become)
        self._known = {(become, kind, name): value for name, value in found.items()}

    def _read_files(self, paths: list[str], become: Become) -> dict[str, KnownFile]:
        """Kind, attributes and checksum of `paths` from one stat and one sha256sum. Links (their target needs a
        program each) and names stat or sha256sum would escape are left out."""
        plain = [p for p in paths if "\n" not in p and "\\" not in p]
        if not plain:
            return {}
        mark, names = f"@@pm-files-{os.urandom(4).hex()}", " ".join(q(p) for p in plain)
        out = self.run(
            f"stat -c '%F|%a|%U|%G|%u|%g|%n' -- {names} 2>/dev/null; echo {mark}; set --; "
            f'for p in {names}; do [ -f "$p" ] && [ ! -L "$p" ] && set -- "$@" "$p"; done; '
            f'[ $# -eq 0 ] || sha256sum -- "$@" 2>/dev/null; true', become=become).stdout
        stats, _, sums = out.partition(mark + "\n")
        checksums = {name: digest for digest, _, name in (line.partition("  ") for line in sums.splitlines())}
        known = {p: KnownFile(FileState("absent"), "") for p in plain}
        for line in stats.splitlines():
            kind, mode, owner, group, uid, gid, name = [*line.split("|", 6), *[""] * 6][:7]
            if name in known:
                if kind == "symbolic link" or not mode.isdigit():
                    del known[name]
                    continue
                kind = "file" if kind.startswith("regular") else kind if kind == "directory" else "other"
                known[name] = KnownFile(FileState(kind, int(mode, 8), owner, group, "", uid, gid),
                                        checksums.get(name, ""))
        return known

    def _read_units(self, units: list[str], become: Become) -> dict[str, dict[str, str]]:
        """UNIT_PROPERTIES of `units` from one systemctl, which answers one block per unit, in order."""
        out = self.run(f"systemctl show {' '.join(f'-p {p}' for p in UNIT_PROPERTIES)} -- "
                       f"{' '.join(q(u) for u in units)}", become=become)
        blocks = out.stdout.strip("\n").split("\n\n")
        if out.rc != 0 or len(blocks) != len(units):
            return {}
        return {unit: dict(line.partition("=")[::2] for line in block.splitlines() if "=" in line)
                for unit, block in zip(units, blocks, strict=True)}

    def run(self, script: str, *, stdin: bytes | None = None, become: Become = Become(),
            env: Mapping[str, Any] | None = None, timeout: float | None = None) -> Any:
        self._known = {}
        if not self.shells:
            return self.conn.run(self.command(script, become, env), stdin=stdin, timeout=timeout)
        # In the kept shell every command already runs in a subshell of its own (machine.sshshell): `eval` there
        # parses and runs the script as `sh -c` would, without a second exec of sh per command (a no-op run
        # makes dozens). The script stays one quoted word, so a syntax error in it fails that command alone.
        command = shlex.join(["env", *_pairs(env), "sh", "-c", script]) if env else f"eval {q(script)}"
        # The locale is set once, when the shell starts: every command inherits it (`env` execs sh in its place).
        return self.conn.run(command, stdin=stdin, timeout=timeout, shell=self._as(become, ["env", _C_LOCALE, "sh"]))

    def reconnect(self, timeout: float) -> None:
        """Re-open the connection after machine.ssh.ConnectionLost (raised by `run`)."""
        self._known = {}
        self.conn.reconnect(timeout)


# Modules parse what commands print (stat's `%F`, apt's and dnf's messages, sysctl's errors), so every command
# runs in the C locale whatever the target's, as Ansible runs its modules. A task's `environment` still wins.
_C_LOCALE = "LC_ALL=C"


def _pairs(env: Mapping[str, Any] | None) -> list[str]:
    return [f"{k}={v}" for k, v in (env or {}).items()]


# -- shell snippets shared by the modules ------------------------------------------------------------------
def home_path(path: str) -> str:
    """`path` as one shell word, a leading `~` or `~user` expanded by the target's shell (as Ansible's `path`
    arguments are, by os.path.expanduser on the target) and the rest quoted."""
    tilde, rest = tilde_prefix(path)
    return tilde + (q(rest) if rest or not tilde else "")


def tilde_prefix(path: str) -> tuple[str, str]:
    """(`~` or `~user` with the slash after it, the rest) of a path the target's shell may expand; ("", path) when
    it does not start so. Unquoted, the shell expands the prefix: it is a user name's characters only."""
    user, slash, rest = path.partition("/")
    if not user.startswith("~") or not all(c.isalnum() or c in "._-" for c in user[1:]):
        return "", path
    return user + slash, rest


def detached(script: str) -> str:
    """Run `script` in a session of its own, its output kept in a file and shown when it ends.

    A package manager killed half-way leaves the host broken. Writing to the SSH channel, it would die of
    SIGPIPE when the connection drops; in the channel's session, Ctrl-C would stop it (machine.ssh stops the
    interrupted command's process group). Detached, it finishes either way, and the next run waits for its
    lock. The file is unlinked at once (read through a second descriptor): nothing is left behind."""
    return "\n".join([
        'log=$(mktemp) || exit 1; exec 3>"$log" 4<"$log"; rm -f "$log"',
        f"setsid -w sh -c {q(script)} >&3 2>&1 </dev/null 3>&- 4<&-; rc=$?",
        "exec 3>&-; cat <&4; exit $rc",
    ])


def stat_line() -> str:
    """Print `kind|mode|owner|group|uid|gid|link-target` of $p (a link itself, not its target), or `absent`;
    leave the kind in $t and the size in $sz for the snippets that follow. One fork, for speed on no-op runs."""
    return ('s=$(stat -c "%F|%a|%U|%G|%u|%g|%s" -- "$p" 2>/dev/null) || s=absent; sz=${s##*|}; s=${s%|*}; '
            'case $s in "symbolic link"*) t=link;; directory*) t=directory;; regular*) t=file;; absent) t=absent;; '
            '*) t=other;; esac; if [ $t = link ]; then echo "link|${s#*|}|$(readlink -- "$p")"; '
            'elif [ $t = absent ]; then echo absent; else echo "$t|${s#*|}|"; fi')


def checksum_line(algorithm: str = "sha256") -> str:
    """After stat_line(): print $p's digest, or an empty line when it is not a regular file."""
    return f'if [ $t = file ]; then h=$({algorithm}sum < "$p"); echo "${{h%% *}}"; else echo; fi'


@dataclass(frozen=True)
class FileState:
    kind: str  # absent, file, directory, link, other
    mode: int | None = None
    owner: str = ""
    group: str = ""
    target: str = ""
    uid: str = ""  # owner and group as numbers, for an `owner`/`group` given as one
    gid: str = ""

    @classmethod
    def parse(cls, line: str) -> FileState:
        """A stat_line() line."""
        parts = line.strip().split("|", 6)
        if parts[0] not in ("file", "directory", "link", "other") or len(parts) < 7:
            return cls("absent")
        kind, mode, owner, group, uid, gid, target = parts
        return cls(kind, int(mode, 8), owner, group, target, uid, gid)

    @property
    def exists(self) -> bool:
        return self.kind != "absent"


# What a service task reads of its unit (machine.roles.modules.system.Service).
UNIT_PROPERTIES = ("LoadState", "ActiveState", "UnitFileState", "NeedDaemonReload")


@dataclass(frozen=True)
class KnownFile:
    """A file as Remote.read_ahead found it: its state, and its sha256 when it is a regular file."""

    state: FileState
    checksum: str


def parse_mode(mode: Any) -> int | None:
    """Ansible's `mode`: an int (YAML read 0644 as octal) or an octal string; symbolic modes are refused."""
    if mode is None:
        return None
    if isinstance(mode, int):
        return mode
    text = str(mode).strip()
    if text and all(c in "01234567" for c in text):
        return int(text, 8)
    raise ValueError(f"mode {mode!r}: only octal modes (e.g. '0644') are supported")


def attrs_script(path: str, current: FileState, mode: int | None, owner: str | None, group: str | None, *,
                 follow: bool = False) -> tuple[str, list[str]]:
    """Commands (and a description of each difference) bringing `path`'s attributes to the wanted ones: those of
    a link itself, unless `follow` (then those of what it points at)."""
    cmds, changes = [], []
    if _differs(owner, current.owner, current.uid) or _differs(group, current.group, current.gid):
        spec = f"{owner or ''}{':' + group if group else ''}"
        cmds.append(f"chown {'' if follow else '-h '}{q(spec)} {q(path)}")
        changes.append(f"owner {current.owner}:{current.group} -> {spec}" if current.exists else f"owner {spec}")
    if mode is not None and current.kind != "link" and current.mode != mode:
        cmds.append(f"chmod {mode:04o} {q(path)}")
        changes.append(f"mode {current.mode:04o} -> {mode:04o}" if current.mode is not None else f"mode {mode:04o}")
    return "; ".join(cmds), changes


def _differs(wanted: str | None, name: str, number: str) -> bool:
    """Whether an owner or group differs from the wanted one, given as a name or as a number (`owner: 0`)."""
    return bool(wanted) and (number if wanted.isdigit() else name) != wanted


def write_script(path: str, mode: int | None, owner: str | None, group: str | None,
                 validate: str | None = None, *, fill: str = 'cat > "$t"') -> str:
    """Write stdin to `path` atomically: a temp file in the same directory, attributes, an optional
    `validate` command (`%s` is the temp file), then rename. `fill` is what puts the content in the temp file
    "$t" (get_url downloads it there; it may `exit 0` to leave `path` as it is)."""
    steps = ["set -e", f"d=$(dirname {q(path)})", 't=$(mktemp "$d/.pm.XXXXXX")', "trap 'rm -f \"$t\"' EXIT", fill]
    if not (owner and group):
        # A replaced file keeps its owner and group unless told otherwise, as Ansible does; a user who may not
        # give the file away (EPERM, not root) gets it as their own, as with Ansible.
        steps.append(f'if [ -e {q(path)} ]; then chown $(stat -L -c %u:%g {q(path)}) "$t" 2>/dev/null || :; fi')
    if owner or group:
        steps.append(f"chown {q((owner or '') + (':' + group if group else ''))} \"$t\"")
    # Without a mode, a replaced file keeps its mode and a new one gets 0666 & ~umask, as Ansible does.
    steps.append(f'chmod {mode:04o} "$t"' if mode is not None
                 else f'if [ -e {q(path)} ]; then chmod $(stat -L -c %a {q(path)}) "$t"; '
                      f'else chmod $(printf %o $((0666 & ~0$(umask)))) "$t"; fi')
    if validate:
        # A refusal is told from the script's own failures by its last line, which refused() reads.
        steps.append(validate.replace("%s", '"$t"') + f' || {{ v=$?; printf "\\n{_REFUSED} %d\\n" $v; exit 1; }}')
    steps += [f'mv -f "$t" {q(path)}', "trap - EXIT"]
    return "; ".join(steps)


_REFUSED = "@@pm-validate-refused@@"


def refused(stdout: str) -> tuple[int, str] | None:
    """(the validate command's exit status, its output) when a write_script() failed because `validate` refused
    the new file; None when it failed otherwise."""
    out, mark, status = stdout.rpartition(f"\n{_REFUSED} ")
    return (int(status), out) if mark and status.strip().isdigit() else None
