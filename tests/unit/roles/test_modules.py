"""Modules against real files in a real shell: desired vs probed state, honest `changed`, check mode, diff."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from pathlib import Path

import pytest

from machine.roles.modules import MODULES, Context, ModuleFailure, commands
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
        except ModuleFailure as e:
            # Registered as the executor does. Any other exception is a crash and must fail the test, so it is
            # not caught here (the executor's own net for those is tested with the executor).
            result = {"changed": False, "failed": True, "msg": e.msg, **e.extra}
        result["_commands"] = len(shell.commands) - before
        return result

    run.role = role
    return run


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


# A failed result also has changed=False: `not res["changed"]` alone would pass when the module failed.
def changed(result: dict) -> dict:
    assert result["changed"] and not result.get("failed"), result
    return result


def ok(result: dict) -> dict:
    assert not result["changed"] and not result.get("failed"), result
    return result


def failure(result: dict) -> str:
    """The message of a failed result (the module refused: nothing changed)."""
    assert result.get("failed") and not result["changed"], result
    return result["msg"]


def test_copy_content_is_idempotent_with_one_probe(mod, tmp_path):
    dest = tmp_path / "etc" / "app.conf"
    dest.parent.mkdir()
    changed(mod("copy", dest=str(dest), content="a=1\n", mode="0640"))
    assert dest.read_text() == "a=1\n" and mode(dest) == 0o640
    assert ok(mod("copy", dest=str(dest), content="a=1\n", mode="0640"))["_commands"] == 1
    # Only the mode drifted: just a chmod, no rewrite.
    dest.chmod(0o600)
    inode = dest.stat().st_ino
    fix = changed(mod("copy", dest=str(dest), content="a=1\n", mode="0640"))
    assert fix["msg"] == "mode 0600 -> 0640" and mode(dest) == 0o640 and dest.stat().st_ino == inode


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_rewritten_files_keep_their_owner_and_group(mod, tmp_path):
    conf, copied, grouped, fetched = (tmp_path / f"{n}.conf" for n in "abcd")
    for path in (conf, copied, grouped, fetched):
        path.write_text("a=1\n")
        os.chown(path, 65534, 65534)
    fetched.chmod(0o640)
    changed(mod("lineinfile", path=str(conf), line="b=2"))
    changed(mod("copy", dest=str(copied), content="new\n"))
    changed(mod("copy", dest=str(grouped), content="new\n", group="0"))  # the owner not given: kept
    (tmp_path / "src").write_text("new\n")
    changed(mod("get_url", url=f"file://{tmp_path / 'src'}", dest=str(fetched), force=True))
    assert fetched.read_text() == "new\n" and mode(fetched) == 0o640
    assert [(p.stat().st_uid, p.stat().st_gid) for p in (conf, copied, grouped, fetched)] == \
        [(65534, 65534)] * 2 + [(65534, 0), (65534, 65534)]
    changed(mod("copy", dest=str(tmp_path / "new.conf"), content="x\n"))  # a new file: the writer's
    assert (tmp_path / "new.conf").stat().st_uid == 0


def test_copy_content_given_a_mapping_or_a_list_writes_json(mod, tmp_path):
    dest = tmp_path / "cfg.json"
    changed(mod("copy", dest=str(dest), content={"a": 1, "b": [True, None]}))  # as `content: "{{ cfg }}"` gives
    assert dest.read_text() == '{"a": 1, "b": [true, null]}'
    changed(mod("copy", dest=str(dest), content=["x", 2]))
    assert dest.read_text() == '["x", 2]'


def test_copy_check_mode_and_diff(mod, tmp_path):
    dest = tmp_path / "f.txt"
    dest.write_text("old\n")
    res = changed(mod("copy", dest=str(dest), content="new\n", check=True, diff=True))
    assert dest.read_text() == "old\n"
    assert "-old\n+new\n" in res["diff"]
    assert res["_commands"] == 1


def test_copy_src_from_role_files_into_a_directory(mod, tmp_path):
    (mod.role / "files" / "hello.txt").write_text("hi\n")
    (tmp_path / "dir").mkdir()
    assert changed(mod("copy", src="hello.txt", dest=str(tmp_path / "dir")))["dest"] == str(tmp_path / "dir/hello.txt")
    assert (tmp_path / "dir" / "hello.txt").read_text() == "hi\n"
    ok(mod("copy", src="hello.txt", dest=str(tmp_path / "dir")))
    assert failure(mod("copy", src="nope.txt", dest=str(tmp_path))) == \
        "could not find src 'nope.txt' (searched the role's files/)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "role"]


def test_copy_validate_refuses_bad_content(mod, tmp_path):
    dest = tmp_path / "v.conf"
    assert failure(mod("copy", dest=str(dest), content="bad\n", validate="grep -q good %s")) == "failed to validate"
    assert not dest.exists() and not list(tmp_path.glob(".pm.*"))
    changed(mod("copy", dest=str(dest), content="good\n", validate="grep -q good %s"))
    assert dest.read_text() == "good\n" and not list(tmp_path.glob(".pm.*"))


def test_template_renders_with_variables(mod, tmp_path):
    (mod.role / "templates" / "t.conf.j2").write_text("{% for p in ports %}\nlisten {{ p }}\n{% endfor %}\n")
    dest = tmp_path / "t.conf"
    res = changed(mod("template", src="t.conf.j2", dest=str(dest), variables={"ports": [80, 443]}, diff=True))
    assert dest.read_text() == "listen 80\nlisten 443\n"
    assert "+listen 443" in res["diff"]
    assert res["checksum"] == hashlib.sha256(b"listen 80\nlisten 443\n").hexdigest()
    ok(mod("template", src="t.conf.j2", dest=str(dest), variables={"ports": [80, 443]}))
    changed(mod("template", src="t.conf.j2", dest=str(dest), variables={"ports": [80]}))
    assert dest.read_text() == "listen 80\n"


def test_file_states(mod, tmp_path):
    d = tmp_path / "a" / "b"
    changed(mod("file", path=str(d), state="directory", mode="0750"))
    assert d.is_dir() and mode(d) == 0o750
    assert ok(mod("file", path=str(d), state="directory", mode="0750"))["_commands"] == 1
    link = tmp_path / "link"
    changed(mod("file", path=str(link), src=str(d), state="link"))
    assert os.readlink(link) == str(d)
    ok(mod("file", path=str(link), src=str(d), state="link"))
    f = tmp_path / "touched"
    changed(mod("file", path=str(f), state="touch", modification_time="preserve", access_time="preserve"))
    assert f.is_file() and f.read_bytes() == b""
    ok(mod("file", path=str(f), state="touch", modification_time="preserve", access_time="preserve"))
    missing = tmp_path / "missing"
    assert failure(mod("file", path=str(missing), state="file")) == \
        f"file ({missing}) is absent, cannot continue"
    assert not missing.exists()
    changed(mod("file", path=str(tmp_path / "a"), state="absent"))
    assert not (tmp_path / "a").exists()
    ok(mod("file", path=str(tmp_path / "a"), state="absent"))
    changed(mod("file", path=str(tmp_path / "x"), state="directory", check=True))
    assert not (tmp_path / "x").exists()


def test_file_follows_links_as_ansible(mod, tmp_path):
    """follow (default true): a link's target is checked and changed; the link itself stays (checked against
    ansible-playbook 2.19)."""
    real, tf = tmp_path / "real", tmp_path / "tf"
    real.mkdir(mode=0o755)
    tf.write_text("a")
    tf.chmod(0o644)
    (tmp_path / "ldir").symlink_to("real")
    (tmp_path / "lf").symlink_to("tf")
    changed(mod("file", path=str(tmp_path / "ldir"), state="directory", mode="0700"))
    assert mode(real) == 0o700 and (tmp_path / "ldir").is_symlink()
    ok(mod("file", path=str(tmp_path / "ldir"), state="directory", mode="0700"))
    changed(mod("file", path=str(tmp_path / "lf"), state="file", mode="0600"))
    assert mode(tf) == 0o600
    changed(mod("file", path=str(tmp_path / "lf"), mode="0640"))  # no state: the link's attributes
    changed(mod("file", path=str(tmp_path / "lf"), src="tf", state="link", mode="0604"))
    assert mode(tf) == 0o604 and os.readlink(tmp_path / "lf") == "tf"
    ok(mod("file", path=str(tmp_path / "lf"), src="tf", state="link", mode="0604"))
    changed(mod("file", path=str(tmp_path / "new"), src="tf", state="link", mode="0602"))
    assert mode(tf) == 0o602 and os.readlink(tmp_path / "new") == "tf"
    (tmp_path / "dangling").symlink_to("sub")
    changed(mod("file", path=str(tmp_path / "dangling"), state="directory", mode="0750"))
    assert mode(tmp_path / "sub") == 0o750
    ok(mod("file", path=str(tmp_path / "lf"), mode="0600", follow=False))
    assert mode(tf) == 0o602
    assert failure(mod("file", path=str(tmp_path / "ldir"), state="directory", follow=False)) == \
        f"{tmp_path / 'ldir'} already exists as a link"
    assert failure(mod("file", path=str(real), state="file")) == f"file ({real}) is directory, cannot continue"
    changed(mod("file", path=str(tmp_path / "lf"), state="absent"))
    assert tf.exists() and not (tmp_path / "lf").is_symlink()


def test_numeric_owner_and_group_are_compared_as_numbers(mod, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    ids = {"owner": str(os.getuid()), "group": str(os.getgid())}
    assert ok(mod("file", path=str(f), **ids))["_commands"] == 1
    assert ok(mod("copy", dest=str(f), content="x", **ids))["_commands"] == 1
    assert "owner" in changed(mod("file", path=str(f), owner=str(os.getuid() + 1), check=True))["msg"]


def test_lineinfile(mod, tmp_path):
    conf = tmp_path / "sshd_config"
    conf.write_text("# comment\nPermitRootLogin yes\nPort 22")
    res = changed(mod("lineinfile", path=str(conf), regexp=r"^#?PermitRootLogin", line="PermitRootLogin no",
                      diff=True))
    assert "-PermitRootLogin yes\n+PermitRootLogin no" in res["diff"]
    assert conf.read_text() == "# comment\nPermitRootLogin no\nPort 22"
    ok(mod("lineinfile", path=str(conf), regexp=r"^#?PermitRootLogin", line="PermitRootLogin no"))
    changed(mod("lineinfile", path=str(conf), line="UseDNS no"))
    assert conf.read_text() == "# comment\nPermitRootLogin no\nPort 22\nUseDNS no\n"
    changed(mod("lineinfile", path=str(conf), line="Banner x", insertafter="^# comment"))
    assert conf.read_text().splitlines()[1] == "Banner x"
    changed(mod("lineinfile", path=str(conf), regexp="^Banner", state="absent"))
    assert conf.read_text() == "# comment\nPermitRootLogin no\nPort 22\nUseDNS no\n"
    changed(mod("lineinfile", path=str(conf), regexp=r"^Port (\d+)", line=r"Port \g<1>0", backrefs=True))
    assert conf.read_text() == "# comment\nPermitRootLogin no\nPort 220\nUseDNS no\n"
    missing = tmp_path / "new.conf"
    assert failure(mod("lineinfile", path=str(missing), line="x=1")) == f"Destination {missing} does not exist !"
    assert not missing.exists()
    changed(mod("lineinfile", path=str(missing), line="x=1", create=True, mode="0600"))
    assert missing.read_text() == "x=1\n" and mode(missing) == 0o600
    changed(mod("lineinfile", path=str(missing), line="y=2", check=True))
    assert missing.read_text() == "x=1\n"


def test_lineinfile_edits_bytes_as_ansible(mod, tmp_path):
    """Lines are bytes split after newlines only: other lines stay byte for byte, whatever their encoding
    (each case checked against ansible-playbook 2.19)."""
    cases = [  # (content, args, result)
        (b"name=caf\xe9\nb=1\n", {"regexp": "^b=", "line": "b=2"}, b"name=caf\xe9\nb=2\n"),
        (b"p=\xff\xfe\nq=1\nq=2\n", {"regexp": "^q=", "state": "absent"}, b"p=\xff\xfe\n"),
        (b"k=1\r\nz=2\r\n", {"regexp": "^k=", "line": "k=1"}, b"k=1\nz=2\r\n"),
        (b"k=1\fk=9\nend\n", {"regexp": "^k=", "line": "k=2"}, b"k=2\nend\n"),  # no line break at \f
        (b"a=1\nc=3", {"regexp": "^c=", "line": "c=3"}, b"a=1\nc=3\n"),  # the exact line gets its newline
        (b"a\nb\nc", {"line": "zz", "insertbefore": "^c"}, b"a\nb\nzz\nc"),
    ]
    for i, (content, args, expected) in enumerate(cases):
        path = tmp_path / f"f{i}"
        path.write_bytes(content)
        changed(mod("lineinfile", path=str(path), **args))
        assert path.read_bytes() == expected, (content, args)
        ok(mod("lineinfile", path=str(path), **args))
    latin = tmp_path / "f0"
    assert "+b=3" in changed(mod("lineinfile", path=str(latin), regexp="^b=", line="b=3", diff=True,
                                 check=True))["diff"]
    assert ok(mod("lineinfile", path=str(tmp_path / "none"), line="x", state="absent"))["msg"] == "file not present"


def test_sysctl_file_only(mod, tmp_path):
    conf = tmp_path / "99-test.conf"
    conf.write_text("# keep me\nvm.swappiness = 10\n")
    res = changed(mod("sysctl", name="vm.swappiness", value="20", sysctl_file=str(conf), reload=False, diff=True))
    assert "+vm.swappiness=20" in res["diff"]
    assert conf.read_text() == "# keep me\nvm.swappiness=20\n"
    assert ok(mod("sysctl", name="vm.swappiness", value=20, sysctl_file=str(conf), reload=False))["_commands"] == 1
    changed(mod("sysctl", name="net.ipv4.tcp_rmem", value="4096  87380 6291456", sysctl_file=str(conf),
                reload=False))
    assert conf.read_text() == "# keep me\nvm.swappiness=20\nnet.ipv4.tcp_rmem=4096 87380 6291456\n"
    # Whitespace inside a value is not a difference (the kernel prints tabs).
    ok(mod("sysctl", name="net.ipv4.tcp_rmem", value="4096 87380\t6291456", sysctl_file=str(conf), reload=False))
    changed(mod("sysctl", name="vm.swappiness", state="absent", sysctl_file=str(conf), reload=False))
    assert conf.read_text() == "# keep me\nnet.ipv4.tcp_rmem=4096 87380 6291456\n"


def test_sysctl_keeps_a_last_line_without_newline_whole(mod, tmp_path):
    conf = tmp_path / "99-test.conf"
    conf.write_text("vm.swappiness=60\nvm.dirty_ratio=20")
    changed(mod("sysctl", name="vm.swappiness", value="10", sysctl_file=str(conf), reload=False))
    assert conf.read_text() == "vm.swappiness=10\nvm.dirty_ratio=20"


def test_command_and_shell(mod, tmp_path, monkeypatch):
    marker = tmp_path / "done"
    res = changed(mod("command", _raw_params=f"touch {marker}", creates=str(marker)))
    assert marker.exists()
    # As Ansible's command module: an empty msg, and when it ran (timed here: Ansible's start, end and delta)
    assert res["msg"] == "" and res["start"] < res["end"] and res["delta"].startswith("0:00:")
    res = ok(mod("command", _raw_params=f"rm {marker}", creates=str(marker)))
    assert marker.exists()
    assert (res["msg"], res["stdout"], res["rc"], res["cmd"], res["delta"]) == (
        f"Did not run command since '{marker}' exists", f"skipped, since {marker} exists", 0, ["rm", str(marker)],
        None)
    monkeypatch.setenv("HOME", "/home/x  y")
    monkeypatch.delenv("PM_UNSET", raising=False)
    res = changed(mod("command", _raw_params="echo 'a  b' $HOME $PM_UNSET | *"))
    assert res["stdout"] == "a  b /home/x  y $PM_UNSET | *"  # no shell: only variables are expanded, as Ansible
    assert res["cmd"] == ["echo", "a  b", "$HOME", "$PM_UNSET", "|", "*"]  # as given, not the script expanding it
    res = changed(mod("command", _raw_params="echo $HOME", expand_argument_vars=False))
    assert res["stdout"] == "$HOME"
    # A non-zero exit: the command ran (changed, as in Ansible) and failed.
    res = mod("shell", cmd="echo one; echo two >&2; exit 4", chdir=str(tmp_path))
    assert (res["rc"], res["stdout"], res["stderr"], res["changed"], res["failed"], res["msg"], res["cmd"]) == (
        4, "one", "two", True, True, "non-zero return code", "echo one; echo two >&2; exit 4")
    assert changed(mod("shell", _raw_params="pwd", chdir=str(tmp_path)))["stdout"] == str(tmp_path)
    assert changed(mod("command", argv=["printf", "%s", "x y"]))["stdout"] == "x y"
    assert changed(mod("shell", _raw_params="cat", stdin="fed"))["stdout"] == "fed"
    res = ok(mod("command", _raw_params=f"touch {tmp_path / 'not-in-check'}", check=True))
    assert res["skipped"] and not (tmp_path / "not-in-check").exists()
    assert res["msg"] == "Command would have run if not in check mode"
    assert changed(mod("command", _raw_params=f"rm {marker}", removes=str(marker), check=True))["_commands"] == 1
    assert marker.exists()
    ok(mod("command", _raw_params="x", removes=str(tmp_path / "absent"), check=True))


@pytest.mark.parametrize("sh", ["dash", "bash"])
def test_command_arguments_expand_as_ansibles_expandvars_and_expanduser(sh, tmp_path):
    """Each word through the target's shell as Ansible expands a command's argument on the target."""
    env = {"PATH": os.environ["PATH"], "HOME": "/home/u v", "V": "a b*", "EMPTY": "", "Q": "it's \"q\" $V"}
    words = ["$V", "${V}", "x$V-y", "$EMPTY.", "$UNSET", "${UNSET}", "$1", "${V", "${}", "$", "a$$b", "~", "~/a b",
             "~root/x", "~nosuchuserpm/x", "x~", "'~'", "$Q", "${Q}${V}$UNSET", "", "*", "a;b", "$V/~"]
    script = "".join(commands.expanded(["printf", "%s\\n", *words]))  # the assignments, then the line
    out = subprocess.run([sh, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    with pytest.MonkeyPatch.context() as mp:
        for key in ("V", "EMPTY", "Q", "UNSET"):
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        wanted = [os.path.expanduser(os.path.expandvars(w)) for w in words]
    assert out.split("\n")[:-1] == wanted


def test_command_creates_and_removes_as_ansible_checks_them(mod, tmp_path, monkeypatch):
    """Glob patterns, `~` expanded, relative to chdir (Ansible changes directory first), in the one command."""
    work = tmp_path / "w w"
    work.mkdir()
    (work / "marker.done").touch()
    res = ok(mod("command", _raw_params="touch ran", chdir=str(work), creates=str(work / "*.done")))
    assert res["_commands"] == 1 and not (work / "ran").exists()
    ok(mod("command", _raw_params="touch ran", chdir=str(work), creates="marker.done"))
    ok(mod("shell", _raw_params="touch ran", chdir=str(work), removes="*.absent"))
    assert not (work / "ran").exists()
    res = changed(mod("shell", _raw_params='echo "$#"; touch ran', chdir=str(work), removes="m*"))
    assert res["stdout"] == "0" and (work / "ran").exists()  # the match left no positional parameters
    monkeypatch.setenv("HOME", str(work))
    ok(mod("command", _raw_params="touch ran2", creates="~/marker.*"))
    ok(mod("command", _raw_params="touch ran2", creates="~/marker.*", check=True))
    assert changed(mod("command", _raw_params="x", removes="~/marker.done", check=True))["_commands"] == 1
    assert not (work / "ran2").exists()


def test_command_check_mode_says_why_it_would_not_run(mod, tmp_path):
    """Worded as ansible-playbook 2.19 --check words it."""
    res = ok(mod("command", _raw_params="x", removes=str(tmp_path / "absent"), check=True))
    assert res["msg"] == f"Would not run command since '{tmp_path / 'absent'}' does not exist"
    assert res["stdout"] == f"skipped, since {tmp_path / 'absent'} does not exist"
    res = changed(mod("command", _raw_params="x", removes=str(tmp_path), check=True))
    assert (res["msg"], "skipped" in res) == ("Command would have run if not in check mode", False)


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
    assert changed(mod("get_url", **args))["msg"] == f"downloaded file://{src}"
    assert dest.read_bytes() == src.read_bytes() and mode(dest) == 0o600
    assert ok(mod("get_url", **args))["_commands"] == 1
    other = tmp_path / "dl" / "other"
    msg = failure(mod("get_url", **{**args, "dest": str(other), "checksum": "sha256:" + "0" * 64}))
    assert msg == f"downloading file://{src} failed (rc=1): checksum mismatch: got sha256:{digest}, expected " \
                  f"sha256:{'0' * 64}"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["payload"]  # no partial download left
    assert failure(mod("get_url", **{**args, "checksum": "crc:1"})) == \
        "checksum must be '<algorithm>:<hex digest>' with one of md5, sha1, sha224, sha256, sha384, sha512"


def test_wait_for_path(mod, tmp_path):
    flag = tmp_path / "ready"
    flag.write_text("state=up\n")
    ok(mod("wait_for", path=str(flag), search_regex="state=up", timeout=2))
    # Ansible 2.19's messages, checked with ansible-playbook.
    assert failure(mod("wait_for", path=str(tmp_path / "never"), timeout=1, sleep=1)) == \
        f"Timeout when waiting for file {tmp_path / 'never'}"
    assert failure(mod("wait_for", path=str(flag), search_regex="state=down", timeout=1, sleep=1)) == \
        f"Timeout when waiting for search string state=down in {flag}"
    ok(mod("wait_for", path=str(tmp_path / "never"), state="absent", timeout=1))
    assert failure(mod("wait_for", path=str(flag), state="absent", timeout=1, sleep=1)) == \
        f"Timeout when waiting for {flag} to be absent."


def test_wait_for_port(mod):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        ok(mod("wait_for", port=port, timeout=2))
        assert failure(mod("wait_for", port=port, state="stopped", timeout=1, sleep=1)) == \
            f"Timeout when waiting for 127.0.0.1:{port} to stop."
    assert failure(mod("wait_for", port=port, timeout=1, sleep=1)) == f"Timeout when waiting for 127.0.0.1:{port}"
    ok(mod("wait_for", port=port, state="stopped", timeout=1))


def test_symbolic_modes_are_refused(mod, tmp_path):
    assert failure(mod("copy", dest=str(tmp_path / "x"), content="x", mode="u+rw")) == \
        "mode 'u+rw': only octal modes (e.g. '0644') are supported"
    assert not (tmp_path / "x").exists()


def test_file_link_to_a_missing_src_is_refused_unless_forced(mod, tmp_path):
    """As ansible-playbook 2.19: the src is looked for beside the link (a relative one too), in check mode too,
    and even when the link is already there; `force` makes the dangling link."""
    link, nowhere = tmp_path / "link", tmp_path / "nowhere"
    refused = f"src file does not exist, use 'force=yes' if you really want to create the link: {nowhere}"
    assert failure(mod("file", path=str(link), src=str(nowhere), state="link")) == refused
    assert failure(mod("file", path=str(link), src="nowhere", state="link", check=True)) == refused
    assert not os.path.lexists(link)
    changed(mod("file", path=str(link), src="nowhere", state="link", force=True))
    assert os.readlink(link) == "nowhere"
    ok(mod("file", path=str(link), src="nowhere", state="link", force=True))
    assert failure(mod("file", path=str(link), src="nowhere", state="link")) == refused
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert failure(mod("file", path=str(plain), src=str(tmp_path), state="link", force=False)) == \
        f"refusing to convert from file to symlink for {plain}"
    assert failure(mod("file", path=str(tmp_path), src=str(plain), state="link")) == \
        f"refusing to convert from directory to symlink for {tmp_path}"
    assert plain.read_text() == "x" and not plain.is_symlink()


def test_arguments_that_exclude_each_other_fail_with_ansibles_words(mod, tmp_path):
    """As ansible-playbook 2.19: copy wants one of src and content, debug one of msg and var."""
    dest = tmp_path / "x"
    assert failure(mod("copy", dest=str(dest))) == "src (or content) is required"
    assert failure(mod("copy", dest=str(dest), content="a", src="f")) == "src and content are mutually exclusive"
    assert failure(mod("debug", msg="m", var="v")) == "parameters are mutually exclusive: msg|var"
    assert not dest.exists()


def test_set_fact_wants_variable_names_as_ansible(mod):
    """As ansible-playbook 2.19 (its words): at least one variable, each an identifier Jinja reads as a name."""
    assert failure(mod("set_fact", cacheable=True)) == \
        "No key/value pairs provided, at least one is required for this action to succeed"
    assert failure(mod("set_fact", **{"bad-name": 1})) == "Invalid variable name 'bad-name'."
    assert failure(mod("set_fact", **{"ok": 1, "None": 2})) == "Invalid variable name 'None'."
    assert mod("set_fact", ok=1)["ansible_facts"] == {"ok": 1}


def test_a_validate_command_that_refuses_fails_as_ansible(mod, tmp_path):
    """As ansible-playbook 2.19 (its words and keys): copy and template fail "failed to validate" with the
    command's exit status and output, lineinfile with its rc and error; a validate without %s is refused; the
    file is left as it was."""
    dest = tmp_path / "conf"
    dest.write_text("old\n")
    res = mod("copy", content="bad\n", dest=str(dest), validate="sh -c 'echo out; echo err >&2; exit 3' %s")
    assert failure(res) == "failed to validate"
    assert (res["exit_status"], res["stdout"], res["stderr"]) == (3, "out\n", "err\n")
    assert failure(mod("lineinfile", path=str(dest), line="bad", validate="sh -c 'echo no >&2; exit 1' %s")) == \
        "failed to validate: rc:1 error:no\n"
    assert failure(mod("copy", content="bad\n", dest=str(dest), validate="true")) == "validate must contain %s: true"
    assert dest.read_text() == "old\n"
    changed(mod("copy", content="good\n", dest=str(dest), validate="grep -q good %s"))
    assert dest.read_text() == "good\n"


def test_a_program_that_cannot_be_run_fails_as_ansibles_command(mod, tmp_path):
    """As ansible-playbook 2.19's command module, which execs the program itself: one not found or not executable
    fails unchanged with "Error executing command." and the errno as rc (not sh's 127 and 126 as if it ran);
    a program found on the PATH runs, and shell runs its line as before."""
    script = tmp_path / "noexec.sh"
    script.write_text("echo hi\n")
    for program, errno in ((str(tmp_path / "missing"), 2), ("no-such-program-pm", 2), (str(script), 13),
                           (str(tmp_path), 13)):
        res = mod("command", _raw_params=f"{program} arg")
        assert failure(res) == "Error executing command." and res["rc"] == errno, res
        assert res["cmd"] == f"{program} arg"
    assert changed(mod("command", argv=["printf", "%s", "x"]))["stdout"] == "x"
    assert changed(mod("command", _raw_params="env", expand_argument_vars=False))["rc"] == 0
    res = mod("shell", _raw_params="no-such-program-pm")
    assert res["failed"] and (res["rc"], res["msg"]) == (127, "non-zero return code")
