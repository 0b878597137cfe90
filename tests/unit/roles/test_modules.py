"""Modules against real files in a real shell: desired vs probed state, honest `changed`, check mode, diff."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from machine.roles.modules import MODULES, Context
from machine.roles.remote import Remote
from machine.roles.templating import Templar, Vars


@pytest.fixture
def mod(shell, tmp_path):
    role = tmp_path / "role"
    (role / "templates").mkdir(parents=True)
    (role / "files").mkdir()
    templar = Templar()

    def run(module: str, check: bool = False, diff: bool = False, variables: dict | None = None, **args):
        before = len(shell.commands)
        ctx = Context(remote=Remote(shell), templar=templar, vars=Vars(templar, [(variables or {}, True)]),
                      facts={}, search_paths={"templates": [role / "templates"], "files": [role / "files"]},
                      check=check, diff=diff)
        try:
            result = MODULES[module](ctx, args).run()
        except Exception as e:  # ModuleFailure, reported as the executor would
            result = {"failed": True, "msg": str(e)}
        result["_commands"] = len(shell.commands) - before
        return result

    run.role = role
    return run


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_copy_content_is_idempotent_with_one_probe(mod, tmp_path):
    dest = tmp_path / "etc" / "app.conf"
    dest.parent.mkdir()
    first = mod("copy", dest=str(dest), content="a=1\n", mode="0640")
    assert first["changed"] and dest.read_text() == "a=1\n" and mode(dest) == 0o640
    again = mod("copy", dest=str(dest), content="a=1\n", mode="0640")
    assert not again["changed"] and again["_commands"] == 1
    # Only the mode drifted: just a chmod, no rewrite.
    dest.chmod(0o600)
    fix = mod("copy", dest=str(dest), content="a=1\n", mode="0640")
    assert fix["changed"] and "mode 0600 -> 0640" in fix["msg"] and mode(dest) == 0o640


def test_copy_check_mode_and_diff(mod, tmp_path):
    dest = tmp_path / "f.txt"
    dest.write_text("old\n")
    res = mod("copy", dest=str(dest), content="new\n", check=True, diff=True)
    assert res["changed"] and dest.read_text() == "old\n"
    assert "-old\n+new\n" in res["diff"]
    assert res["_commands"] == 1


def test_copy_src_from_role_files_into_a_directory(mod, tmp_path):
    (mod.role / "files" / "hello.txt").write_text("hi\n")
    (tmp_path / "dir").mkdir()
    assert mod("copy", src="hello.txt", dest=str(tmp_path / "dir"))["changed"]
    assert (tmp_path / "dir" / "hello.txt").read_text() == "hi\n"
    assert not mod("copy", src="hello.txt", dest=str(tmp_path / "dir"))["changed"]
    assert "could not find src 'nope.txt'" in mod("copy", src="nope.txt", dest=str(tmp_path))["msg"]


def test_copy_validate_refuses_bad_content(mod, tmp_path):
    dest = tmp_path / "v.conf"
    res = mod("copy", dest=str(dest), content="bad\n", validate="grep -q good %s")
    assert res["failed"] and not dest.exists() and not list(tmp_path.glob(".pm.*"))


def test_template_renders_with_variables(mod, tmp_path):
    (mod.role / "templates" / "t.conf.j2").write_text("{% for p in ports %}\nlisten {{ p }}\n{% endfor %}\n")
    dest = tmp_path / "t.conf"
    res = mod("template", src="t.conf.j2", dest=str(dest), variables={"ports": [80, 443]}, diff=True)
    assert res["changed"] and dest.read_text() == "listen 80\nlisten 443\n"
    assert "+listen 443" in res["diff"]
    assert not mod("template", src="t.conf.j2", dest=str(dest), variables={"ports": [80, 443]})["changed"]
    assert mod("template", src="t.conf.j2", dest=str(dest), variables={"ports": [80]})["changed"]
    assert res["checksum"] == hashlib.sha256(b"listen 80\nlisten 443\n").hexdigest()


def test_file_states(mod, tmp_path):
    d = tmp_path / "a" / "b"
    assert mod("file", path=str(d), state="directory", mode="0750")["changed"]
    assert d.is_dir() and mode(d) == 0o750
    again = mod("file", path=str(d), state="directory", mode="0750")
    assert not again["changed"] and again["_commands"] == 1
    link = tmp_path / "link"
    assert mod("file", path=str(link), src=str(d), state="link")["changed"]
    assert os.readlink(link) == str(d)
    assert not mod("file", path=str(link), src=str(d), state="link")["changed"]
    f = tmp_path / "touched"
    assert mod("file", path=str(f), state="touch", modification_time="preserve", access_time="preserve")["changed"]
    assert not mod("file", path=str(f), state="touch", modification_time="preserve",
                   access_time="preserve")["changed"]
    assert "does not exist" in mod("file", path=str(tmp_path / "missing"), state="file")["msg"]
    assert mod("file", path=str(tmp_path / "a"), state="absent")["changed"] and not d.exists()
    assert not mod("file", path=str(tmp_path / "a"), state="absent")["changed"]
    res = mod("file", path=str(tmp_path / "x"), state="directory", check=True)
    assert res["changed"] and not (tmp_path / "x").exists()


def test_lineinfile(mod, tmp_path):
    conf = tmp_path / "sshd_config"
    conf.write_text("# comment\nPermitRootLogin yes\nPort 22")
    res = mod("lineinfile", path=str(conf), regexp=r"^#?PermitRootLogin", line="PermitRootLogin no", diff=True)
    assert res["changed"] and "-PermitRootLogin yes\n+PermitRootLogin no" in res["diff"]
    assert conf.read_text() == "# comment\nPermitRootLogin no\nPort 22"
    assert not mod("lineinfile", path=str(conf), regexp=r"^#?PermitRootLogin", line="PermitRootLogin no")["changed"]
    assert mod("lineinfile", path=str(conf), line="UseDNS no")["changed"]
    assert conf.read_text().endswith("Port 22\nUseDNS no\n")
    assert mod("lineinfile", path=str(conf), line="Banner x", insertafter="^# comment")["changed"]
    assert conf.read_text().splitlines()[1] == "Banner x"
    assert mod("lineinfile", path=str(conf), regexp="^Banner", state="absent")["changed"]
    assert "Banner" not in conf.read_text()
    assert mod("lineinfile", path=str(conf), regexp=r"^Port (\d+)", line=r"Port \g<1>0", backrefs=True)["changed"]
    assert "Port 220\n" in conf.read_text()
    missing = tmp_path / "new.conf"
    assert "does not exist" in mod("lineinfile", path=str(missing), line="x=1")["msg"]
    assert mod("lineinfile", path=str(missing), line="x=1", create=True, mode="0600")["changed"]
    assert missing.read_text() == "x=1\n" and mode(missing) == 0o600
    res = mod("lineinfile", path=str(missing), line="y=2", check=True)
    assert res["changed"] and missing.read_text() == "x=1\n"


def test_sysctl_file_only(mod, tmp_path):
    conf = tmp_path / "99-test.conf"
    conf.write_text("# keep me\nvm.swappiness = 10\n")
    res = mod("sysctl", name="vm.swappiness", value="20", sysctl_file=str(conf), reload=False, diff=True)
    assert res["changed"] and "+vm.swappiness=20" in res["diff"]
    assert conf.read_text() == "# keep me\nvm.swappiness=20\n"
    again = mod("sysctl", name="vm.swappiness", value=20, sysctl_file=str(conf), reload=False)
    assert not again["changed"] and again["_commands"] == 1
    assert mod("sysctl", name="net.ipv4.tcp_rmem", value="4096  87380 6291456", sysctl_file=str(conf),
               reload=False)["changed"]
    assert not mod("sysctl", name="net.ipv4.tcp_rmem", value="4096 87380\t6291456", sysctl_file=str(conf),
                   reload=False)["changed"]
    assert mod("sysctl", name="vm.swappiness", state="absent", sysctl_file=str(conf), reload=False)["changed"]
    assert "swappiness" not in conf.read_text()


def test_command_and_shell(mod, tmp_path):
    marker = tmp_path / "done"
    res = mod("command", _raw_params=f"touch {marker}", creates=str(marker))
    assert res["changed"] and marker.exists()
    res = mod("command", _raw_params=f"touch {marker}", creates=str(marker))
    assert not res["changed"] and "exists" in res["msg"]
    res = mod("command", _raw_params="echo 'a  b' $HOME |")
    assert res["stdout"] == "a  b $HOME |"  # no shell: words are passed through
    res = mod("shell", cmd="echo one; echo two >&2; exit 4", chdir=str(tmp_path))
    assert (res["rc"], res["stdout"], res["stderr"], res["failed"]) == (4, "one", "two", True)
    assert mod("shell", _raw_params="pwd", chdir=str(tmp_path))["stdout"] == str(tmp_path)
    assert mod("command", argv=["printf", "%s", "x y"])["stdout"] == "x y"
    assert mod("shell", _raw_params="cat", stdin="fed")["stdout"] == "fed"
    assert mod("command", _raw_params="false", check=True)["skipped"]
    assert not mod("command", _raw_params="x", removes=str(tmp_path / "absent"), check=True)["changed"]


def test_command_free_form_inline_options():
    args = MODULES["command"].parse_free_form("creates=/etc/x chdir='/tmp' make install")
    assert args == {"creates": "/etc/x", "chdir": "/tmp", "_raw_params": "make install"}


def test_get_url_file_url_with_checksum(mod, tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(b"\x00payload\n")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "dl" / "payload"
    dest.parent.mkdir()
    args = {"url": f"file://{src}", "dest": str(dest), "checksum": f"sha256:{digest}", "mode": "0600"}
    assert mod("get_url", **args)["changed"]
    assert dest.read_bytes() == src.read_bytes() and mode(dest) == 0o600
    again = mod("get_url", **args)
    assert not again["changed"] and again["_commands"] == 1
    bad = mod("get_url", **{**args, "dest": str(tmp_path / "dl" / "other"), "checksum": "sha256:" + "0" * 64})
    assert bad["failed"] and "checksum mismatch" in bad["msg"] and not (tmp_path / "dl" / "other").exists()
    assert mod("get_url", **{**args, "checksum": "crc:1"})["failed"]


def test_wait_for_path(mod, tmp_path):
    flag = tmp_path / "ready"
    flag.write_text("state=up\n")
    assert not mod("wait_for", path=str(flag), search_regex="state=up", timeout=2)["changed"]
    res = mod("wait_for", path=str(tmp_path / "never"), timeout=1, sleep=1)
    assert res["failed"] and "Timeout when waiting for" in res["msg"]
    assert not mod("wait_for", path=str(tmp_path / "never"), state="absent", timeout=1).get("failed")


def test_symbolic_modes_are_refused(mod, tmp_path):
    assert "only octal modes" in mod("copy", dest=str(tmp_path / "x"), content="x", mode="u+rw")["msg"]
