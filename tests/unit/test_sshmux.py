"""machine.sshmux without a server: the setting, the control directory, one master per login (the protocol
spoken to a master: tests/unit/test_muxclient.py). Kept connections to a real sshd are
tested in tests/integration/test_provision_faults.py (one login for many commands, Ctrl-C, a killed connection)
and by `leftovers()` after every `rm` of the integration suite."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine import sshmux
from machine.endpoint import Endpoint
from machine.errors import MachineError


@pytest.fixture(autouse=True)
def own_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary directory of its own, short as /tmp's: a socket's path has ~104 bytes (pytest's are longer)."""
    short = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(short))
    yield short
    shutil.rmtree(short)


def test_the_setting_is_seconds_and_zero_turns_it_off(monkeypatch):
    monkeypatch.delenv(sshmux.PERSIST_ENV, raising=False)
    assert sshmux.persist_seconds() == 600
    monkeypatch.setenv(sshmux.PERSIST_ENV, "0")
    assert sshmux.persist_seconds() == 0 and sshmux.client() is None
    for bad in ("1m", "\u00b2", "9999999999"):  # a superscript two is a digit to str.isdigit; ssh refuses 10 digits
        monkeypatch.setenv(sshmux.PERSIST_ENV, bad)
        with pytest.raises(MachineError, match=rf"PYMACHINE_SSH_PERSIST='{bad}': expected a number of seconds"):
            sshmux.client()


def master(tmp_path: Path, host: str = "10.0.0.5", pin: str = "10.0.0.5 ssh-ed25519 AAAA\n",
           name: str = "m1") -> sshmux.Master:
    directory = tmp_path / name
    directory.mkdir(exist_ok=True)
    (directory / "known_hosts").write_text(pin)
    return sshmux.Master("ssh", Endpoint(host), directory / "id_ed25519", directory / "known_hosts", 10)


def test_a_master_per_login_named_after_its_machine(own_tmp):
    first = master(own_tmp)
    assert first.path.parent == own_tmp / f"pymachine-{os.getuid()}"
    assert (first.path.parent.stat().st_mode & 0o777) == 0o700
    assert first.path.name.startswith(sshmux.machine_prefix(own_tmp / "m1" / "known_hosts") + "-")
    assert len(first.path.name) == 33  # a socket's path is limited to ~104 bytes: /tmp/pymachine-0/ and this
    assert master(own_tmp).path == first.path
    # Another address, another pinned key, another machine: never the same master.
    others = {master(own_tmp, host="10.0.0.6").path, master(own_tmp, pin="10.0.0.5 ssh-ed25519 BBBB\n").path,
              master(own_tmp, name="m2").path}
    assert first.path not in others and len(others) == 3
    argv = first.argv("uptime")
    assert argv[-3:] == ["10.0.0.5", "--", "uptime"] and "-T" in argv
    assert f'ControlPath="{first.path}"' in argv and "StrictHostKeyChecking=yes" in argv


@pytest.mark.skipif(not shutil.which("ssh"), reason="needs the OpenSSH client")
def test_paths_reach_ssh_whole_whatever_their_characters(own_tmp):
    odd = own_tmp / "a home" / "100%"
    odd.mkdir(parents=True)
    mux = master(odd)
    settings = subprocess.run(["ssh", "-G", *mux.argv()[1:]], capture_output=True, text=True, check=True).stdout
    values = dict(line.split(" ", 1) for line in settings.splitlines())
    assert values["userknownhostsfile"] == str(odd / "m1/known_hosts")
    # `ssh -G` shows IdentityFile before its %-tokens are expanded, as it is when the key is loaded.
    assert values["identityfile"] == str(odd / "m1/id_ed25519").replace("%", "%%")
    assert values["controlpath"] == str(mux.path) and values["checkhostip"] == "no"
    # A whole list (older clients refuse `^`), paramiko's exchange first.
    assert values["kexalgorithms"].split(",")[0] == "curve25519-sha256"


def test_no_control_directory_anyone_else_can_open(own_tmp, caplog, monkeypatch):
    """Refused, with a warning: no connection is kept (every command logs in, as before), nothing fails."""
    monkeypatch.delenv(sshmux.PERSIST_ENV, raising=False)
    shared = own_tmp / f"pymachine-{os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert sshmux.client() is None and sshmux.client() is None
    assert caplog.text.count(f"{shared} is not a directory only user {os.getuid()} can open") == 1  # once a command
    plain = master(own_tmp)
    assert plain.path is None and not plain.listening() and not any("Control" in a for a in plain.argv())
    shared.rmdir()
    shared.symlink_to(own_tmp)
    assert sshmux.client() is None
    shared.unlink()
    assert sshmux.client() is not None  # made anew, mode 0700

    # A directory above it that another user could rename or fill: they could serve a socket of their own there.
    scratch = own_tmp / "scratch"
    scratch.mkdir()
    scratch.chmod(0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert sshmux.client() is None and f"{scratch} can be changed by another user" in caplog.text
    scratch.chmod(0o1777)  # sticky, as /tmp: only the owner renames what is in it
    assert sshmux.client() is not None
    # Too long for a socket's path: ssh would fail each time, after a login.
    deep = own_tmp / ("d" * 60)
    deep.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    assert sshmux.client() is None and "too long for a socket's path" in caplog.text


def test_forget_removes_a_dead_masters_socket(own_tmp):
    stale = master(own_tmp).path
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(stale))  # bound, never listening: what a master killed with SIGKILL leaves
    other = master(own_tmp, name="m2").path
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(other))
    assert not master(own_tmp).listening()
    sshmux.forget(own_tmp / "m1" / "known_hosts")
    assert not stale.exists() and other.exists()
