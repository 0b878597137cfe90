"""ssh, scp and mount."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import sshfs, sshmux
from machine.commands.common import connect, load
from machine.drivers.base import State
from machine.errors import MachineError, UsageError
from machine.names import LABEL as _LABEL
from machine.store import Store


def ssh(store: Store, name: str, command: list[str]) -> int:
    """Run `command` on the machine (an interactive shell when empty); return its exit status."""
    machine, driver = load(store, name)
    if driver.state() != State.RUNNING:
        raise driver.not_running()
    endpoint = driver.ssh_endpoint()._replace(name=machine.name)
    client = shutil.which("ssh")
    if client:
        # Through the machine's kept connection (machine.sshmux): a loop of `pymachine ssh` logs in once.
        argv = sshmux.Master(client, endpoint, machine.key_path, machine.known_hosts_path, 10).argv(terminal=None)
        return subprocess.call([*argv, *command], cwd="/")  # a master it starts must keep no directory busy
    if not command:
        raise MachineError("an interactive shell needs the ssh client (Debian: apt-get install openssh-client)")
    with connect(machine, driver, timeout=10) as conn:
        stdin = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
        result = conn.run(shlex.join(command) if len(command) > 1 else command[0], stdin=stdin,
                          stream=_write_stream)
    return result.rc


def _write_stream(kind: str, data: bytes) -> None:
    out = sys.stdout if kind == "stdout" else sys.stderr
    out.buffer.write(data)
    out.flush()


def _split(store: Store, spec: str) -> tuple[str | None, str]:
    """'NAME:PATH' names a machine's path when NAME is a machine; anything else is local."""
    head, sep, tail = spec.partition(":")
    if sep and head and "/" not in head and store.exists(head):
        return head, tail or "."
    return None, spec


def _unknown_machine(spec: str) -> MachineError | None:
    """`no machine named NAME` for a NAME:PATH whose NAME could be a machine's but is none of the store's."""
    head, sep, _ = spec.partition(":")
    return MachineError(f"no machine named {head!r}") if sep and _LABEL.fullmatch(head) else None


def scp(store: Store, source: str, destination: str, recursive: bool = False, delta: bool = False) -> None:
    """Copy between the host and machines (NAME:PATH); with `delta`, only the files that differ (rsync's quick
    check: size, time and permissions; the copies keep their source's time)."""
    src_machine, src_path = _split(store, source)
    dst_machine, dst_path = _split(store, destination)
    if src_machine is None and dst_machine is None:
        raise _unknown_machine(source) or _unknown_machine(destination) or UsageError(
            "one side of scp must be MACHINE:PATH")
    if src_machine is not None and dst_machine is not None:
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / Path(src_path.rstrip("/")).name
            # Staged with the source's times, which a delta copy to the other machine compares.
            _copy(store, src_machine, src_path, staged, download=True, recursive=recursive, delta=True)
            _copy(store, dst_machine, dst_path, staged, download=False, recursive=recursive, delta=delta)
        return
    if src_machine is not None:
        _copy(store, src_machine, src_path, Path(dst_path), download=True, recursive=recursive, delta=delta)
    else:
        if not Path(src_path).exists():
            raise UsageError(f"{src_path}: no such file or directory")
        _copy(store, dst_machine, dst_path, Path(src_path), download=False, recursive=recursive, delta=delta)


def _copy(store: Store, name: str, remote: str, local: Path, download: bool, recursive: bool, delta: bool) -> None:
    machine, driver = load(store, name)
    if driver.state() != State.RUNNING:
        raise driver.not_running()
    with connect(machine, driver, timeout=10) as conn:  # its file errors are one line naming NAME:PATH
        if download:
            target = local / Path(remote.rstrip("/")).name if local.is_dir() else local
            conn.get(remote, target, recursive, delta)
        else:
            target = remote.rstrip("/") + "/" + local.name if conn.remote_is_dir(remote) else remote
            conn.put(local, target, recursive, delta)


def mount(store: Store, source: str, mountpoint: str | None = None, unmount: bool = False) -> None:
    """Mount the machine's directory NAME:PATH on the host (on the same path by default, as docker-machine does),
    or unmount it."""
    name, path = _split(store, source)
    if name is None:
        raise _unknown_machine(source) or UsageError(f"{source}: not MACHINE:PATH")
    if mountpoint is None and not path.startswith("/"):
        raise UsageError(f"{source}: name a mount point (the path on the machine is not absolute)")
    local = Path(mountpoint or path).resolve()
    machine, driver = load(store, name)
    if unmount:
        if local not in sshfs.mounts(machine.dir):
            raise UsageError(f"{local}: no directory of {name} is mounted there")
        sshfs.unmount(local)
        return
    if not local.is_dir():
        raise UsageError(f"{local}: no such directory (the mount point must exist)")
    if driver.state() != State.RUNNING:
        raise driver.not_running()
    endpoint = driver.ssh_endpoint()._replace(name=machine.name)
    sshfs.mount(endpoint, machine.key_path, machine.known_hosts_path, machine.dir, path, local)
