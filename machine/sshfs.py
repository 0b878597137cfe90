"""A machine's directory mounted on the host with sshfs (docker-machine's `mount`).

sshfs runs the same ssh command line as `pymachine ssh`, so it goes over the machine's kept connection and
checks its pinned host key. Each mount is named after the machine's directory in the store (FUSE's `fsname`),
so that `rm` finds the machine's mounts and takes them down with it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from machine import sshmux
from machine.endpoint import Endpoint
from machine.errors import MachineError

MOUNTINFO = Path("/proc/self/mountinfo")


def mount(endpoint: Endpoint, key_path: Path, known_hosts: Path, machine_dir: Path, path: str,
          mountpoint: Path) -> None:
    """Mount the machine's `path` on `mountpoint` (an existing directory); back once it is mounted."""
    sshfs, ssh = shutil.which("sshfs"), shutil.which("ssh")
    if not sshfs or not ssh:
        raise MachineError("mount needs sshfs and the ssh client (Debian: apt-get install sshfs openssh-client)")
    # sshfs splits ssh_command at spaces (a backslash keeps one), and FUSE splits -o at commas (idem).
    command = " ".join(_escaped(word, " ") for word in sshmux.Master(
        ssh, endpoint, key_path, known_hosts, 10).options())
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    name = f"{machine_dir.resolve()}:{path}"
    proc = subprocess.run(
        [sshfs, "-o", "ssh_command=" + _escaped(command, ","), "-o", "fsname=" + _escaped(name, ","),
         f"{host}:{path}", str(mountpoint)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd="/")  # the daemon keeps no directory busy
    if proc.returncode != 0:
        raise MachineError(f"{endpoint.name}:{path}: not mounted: {_last_line(proc.stderr)}")


def unmount(mountpoint: Path, lazy: bool = False) -> None:
    """Unmount a mount; `lazy`, also one in use (it is gone from the host at once, and ends when it is let go)."""
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if not fusermount:
        raise MachineError("unmounting needs fusermount (Debian: apt-get install fuse3)")
    proc = subprocess.run([fusermount, "-u", *(["-z"] if lazy else []), str(mountpoint)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise MachineError(f"{mountpoint}: not unmounted: {_last_line(proc.stderr)}")


def mounts(machine_dir: Path) -> list[Path]:
    """The mount points of the machine's sshfs mounts on this host."""
    found = []
    for line in MOUNTINFO.read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        kind, source = [*tail.split(), "", ""][:2]
        if kind == "fuse.sshfs" and _unescaped(source).startswith(f"{machine_dir.resolve()}:"):
            found.append(Path(_unescaped(fields.split()[4])))
    return found


def _escaped(text: str, separator: str) -> str:
    return text.replace("\\", "\\\\").replace(separator, "\\" + separator)


def _unescaped(field: str) -> str:
    """A mountinfo field as written: the kernel writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["(no message)"])[-1]
