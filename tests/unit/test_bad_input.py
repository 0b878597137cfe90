"""A corpus of bad input, run through the real CLI: each case ends with one line on stderr
(`pymachine: error: …`), a non-zero exit, no traceback, and a store left exactly as it was.

The cases run the CLI's main() in this process, with the case's own environment and argv (a process per
case would cost a second of imports each); the --debug case runs a process, as its logging setup is global.
No case may get as far as making a machine: PATH holds no tools, so a create that slipped through every
check would stop at the local driver's tool check (as root) or its root check, and fail its case's message.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from machine.cli import main
from machine.drivers.local import LocalDriver
from machine.store import Store

ROLES = Path(__file__).resolve().parents[2] / "roles"
SHA = "ab" * 32

Setup = Callable[[Path], dict[str, str]]  # gets a scratch directory, returns extra environment


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    code: int
    text: str  # a fragment of the error line
    setup: Setup | None = None
    env: dict[str, str] = field(default_factory=dict)
    lines: int = 1  # a command over several names reports each failure on its own line

    def __str__(self) -> str:
        env = [f"{k}={v}" for k, v in self.env.items()]
        broken = [f"[{self.text}]"] if self.setup else []
        return " ".join([*env, *self.argv, *broken])[:90]


def usage(*argv: str, text: str, **kw) -> Case:
    return Case(argv, 2, text, **kw)


def failure(*argv: str, text: str, **kw) -> Case:
    return Case(argv, 1, text, **kw)


# -- setups ----------------------------------------------------------------------------------------------------
def broken_roles(edit: Callable[[Path], None]) -> Setup:
    """A copy of the shipped roles with one file broken, as PYMACHINE_ROLES_PATH."""
    def setup(scratch: Path) -> dict[str, str]:
        roles = scratch / "roles"
        shutil.copytree(ROLES, roles)  # follows the templates/ symlinks: the copy is self-contained
        edit(roles)
        return {"PYMACHINE_ROLES_PATH": str(roles)}

    return setup


def write(rel: str, text: str) -> Callable[[Path], None]:
    return lambda roles: (roles / rel).write_text(text)


def append_task(text: str) -> Callable[[Path], None]:
    def edit(roles: Path) -> None:
        path = roles / "kernel/tasks/main.yml"
        path.write_text(path.read_text() + "\n" + text)

    return edit


def remove(rel: str) -> Callable[[Path], None]:
    return lambda roles: (roles / rel).unlink()


def damaged_record(scratch: Path) -> dict[str, str]:
    (scratch / "home/machines/web1/config.json").write_text("{not json")
    return {}


# -- the corpus --------------------------------------------------------------------------------------------------
LOCAL = ("--local-bridge", "pmtc9", "--local-subnet", "10.231.243.0/24")  # never used: nothing gets that far

NAMES = [
    usage("create", "", text="must not be empty"),
    usage("create", "x" * 64, text="longer than 63"),
    usage("create", "has space", text="invalid machine name"),
    usage("create", "--", "-web", text="invalid machine name '-web'"),
    usage("create", "web-", text="invalid machine name 'web-'"),
    usage("create", "wéb", text="invalid machine name 'wéb'"),
    usage("create", "..", text="invalid machine name '..'"),
    usage("create", "a/b", text="invalid machine name 'a/b'"),
    usage("create", "dot.ted", text="invalid machine name"),
    usage("create", "web1", text="machine 'web1' already exists"),
    usage("status", "..", text="invalid machine name '..'"),
    usage("rm", "-f", "..", text="invalid machine name '..'"),
    usage("rm", "-y", "web1", "../machines", text="invalid machine name '../machines'"),
    usage("create", "new1", "new1", text="machine name 'new1' is given more than once"),
    usage("rm", "-y", "web1", "web1", text="machine name 'web1' is given more than once"),
    usage("stop", "web1", "web2", "web1", text="machine name 'web1' is given more than once"),
    usage("swarm", "join", "web1", "web1", "--manager", "web2", text="machine name 'web1' is given more than once"),
    usage("inspect", "a/b", text="invalid machine name"),
    usage("ssh", "", text="must not be empty"),
    usage("inventory", "--host", "../web1", text="invalid machine name"),
]

ENGINE = [
    usage("create", "--engine-mtu", "abc", "w", text="'abc' is not a valid integer"),
    usage("create", "--engine-mtu", "67", "w", text="--engine-mtu: 67 is not between 68 and 65535"),
    usage("create", "--engine-mtu", "65536", "w", text="not between 68 and 65535"),
    usage("create", "--engine-bip", "notacidr", "w", text="--engine-bip: 'notacidr' is not an address"),
    usage("create", "--engine-bip", "10.250.0.0/24", "w", text="is a network address"),
    usage("create", "--engine-bip", "fd00::1/64", "w", text="is not IPv4"),
    usage("create", "--engine-opt", "debug", "w", text="--engine-opt: 'debug' is not KEY=VALUE"),
    usage("create", "--engine-opt", "=1", "w", text="is not KEY=VALUE"),
    usage("create", "--engine-opt", "tlsverify=false", "w", text="--engine-opt tlsverify: pymachine sets it"),
    usage("create", "--engine-opt", "hosts=[\"tcp://0.0.0.0:2375\"]", "w", text="--engine-opt hosts"),
    usage("create", "--engine-opt", "bip=10.9.0.1/24", "w", text="use --engine-bip"),
    usage("create", "--engine-default-address-pool", "junk", "w", text="'junk' is not KEY=VALUE"),
    usage("create", "--engine-default-address-pool", "base=10.0.0.0/8", "w", text="is not base=CIDR,size=N"),
    usage("create", "--engine-default-address-pool", "base=10.0.0.0/8,size=x", "w", text="is not base=CIDR"),
    usage("create", "--engine-default-address-pool", "base=10.0.0.1/8,size=16", "w", text="host bits set"),
    usage("create", "--engine-default-address-pool", "base=10.0.0.0/16,size=8", "w", text="does not fit"),
    usage("create", "--engine-default-address-pool", "base=10.0.0.0/8,size=16,gw=1", "w", text="unknown field"),
    usage("create", "--engine-label", "team", "w", text="--engine-label: 'team' is not KEY=VALUE"),
    usage("create", "--engine-env", "PROXY", "w", text="--engine-env: 'PROXY' is not KEY=VALUE"),
    usage("create", "--engine-env", "1PROXY=x", "w", text="'1PROXY' is not a variable name"),
    usage("create", "--engine-env", "HTTP-PROXY=x", "w", text="is not a variable name"),
    usage("create", "--tls-san", "", "w", text="--tls-san: '' is neither an IP address nor a DNS name"),
    usage("create", "--tls-san", "bad name!", "w", text="neither an IP address nor a DNS name"),
    usage("create", "--tls-san", "*.*", "w", text="neither an IP address nor a DNS name"),
    usage("create", "--tls-san", "a..b", "w", text="neither an IP address nor a DNS name"),
    usage("create", "--tls-san", "fe80::1%eth0", "w", text="neither an IP address nor a DNS name"),
    usage("create", "--engine-insecure-registry", "", "w", text="--engine-insecure-registry: '' is not HOST"),
    usage("create", "--engine-insecure-registry", "http://reg:5000", "w", text="no scheme"),
    usage("create", "--engine-insecure-registry", "reg:port", "w", text="--engine-insecure-registry: 'reg:port'"),
    usage("create", "--engine-insecure-registry", "10.0.0.0/33", "w", text="or a CIDR"),
    usage("create", "--engine-registry-mirror", "mirror.example", "w", text="is not an http(s) URL"),
    usage("create", "--engine-registry-mirror", "ftp://mirror.example", "w", text="is not an http(s) URL"),
    usage("create", "--engine-install-url", "ftp://mirror.example/linux", "w", text="is not an http(s) URL"),
    usage("create", "--engine-install", "distro", "--engine-install-url", "https://mirror.example/linux", "w",
          text="--engine-install-url: only Docker's official repository"),
    usage("cache", "prune", "--everything", text="No such option '--everything'"),
    usage("create", "--engine", "lxd", "w", text="Invalid value for '--engine'"),
    usage("create", "--engine-install", "source", "w", text="Invalid value for '--engine-install'"),
    usage("create", "--engine-storage-driver", "ext4", "w", text="Invalid value for '--engine-storage-driver'"),
    usage("create", "--engine-storage-driver", "aufs", "w", text="no current engine supports aufs"),
    usage("create", "--engine", "podman", "--engine-storage-driver", "devicemapper", "w", text="podman supports"),
    usage("create", "--engine-storage-device", "/dev/vdb", "w", text="--engine-storage-device needs"),
    usage("create", "--engine-storage-driver", "btrfs", "--engine-storage-device", "vdb", "w",
          text="'vdb' is not an absolute path"),
    usage("create", "--engine-icc=yes", "w", text="does not take a value"),  # (create takes several names)
]

LOCAL_DRIVER = [
    usage("create", "--local-subnet", "junk", "w", text="--local-subnet"),
    usage("create", "--local-subnet", "10.0.0.1/24", "w", text="host bits"),
    usage("create", "--local-subnet", "10.0.0.0/30", "w", text="too small"),
    usage("create", "--local-subnet", "fd00::/64", "w", text="--local-subnet"),
    usage("create", "--local-bridge", "a-bridge-name-too-long", "w", text="--local-bridge"),
    usage("create", "--local-bridge", "br/0", "w", text="is not an interface name"),
    usage("create", "--local-release", "Bad/Release", "w", text="--local-release: 'Bad/Release'"),
    usage("create", "--local-release", "", "w", text="is not a release name"),
    usage("create", "--local-image", "/nonexistent/rootfs.tar", "w", text="is not a file or an http(s) URL"),
    usage("create", "--local-image", "ftp://127.0.0.1/rootfs.tar", "w", text="unsupported URL scheme 'ftp'"),
    usage("create", "--local-image", "/etc/hostname", "--local-image-sha256", "xyz", "w", text="not a sha256"),
    usage("create", "--local-image-sha256", SHA, "w", text="--local-image-sha256 needs --local-image"),
    usage("create", "--libvirt-cpus", "2", "w", text="--libvirt-cpus is not an option of the local driver"),
]

LIBVIRT_DRIVER = [
    usage("create", "-d", "libvirt", "--libvirt-cpus", "0", "w", text="--libvirt-cpus: 0 is less than 1"),
    usage("create", "-d", "libvirt", "--libvirt-cpus", "two", "w", text="--libvirt-cpus: 'two' is not a valid int"),
    usage("create", "-d", "libvirt", "--libvirt-memory", "x", "w", text="--libvirt-memory: 'x' is not a valid int"),
    usage("create", "-d", "libvirt", "--libvirt-memory", "-5", "w", text="--libvirt-memory: -5 is less than"),
    usage("create", "-d", "libvirt", "--libvirt-disk-size", "0", "w", text="--libvirt-disk-size: 0 is less than 1"),
    usage("create", "-d", "libvirt", "--libvirt-domain-type", "xen", "w", text="is not one of auto, kvm, qemu"),
    usage("create", "-d", "libvirt", "--libvirt-image-sha256", SHA, "w", text="not to an alias"),
    usage("create", "-d", "libvirt", "--libvirt-image", "/etc/hostname", "--libvirt-image-sha256", "zz", "w",
          text="'zz' is not a sha256"),
    usage("create", "-d", "libvirt", "--libvirt-image", "/nonexistent.qcow2", "w", text="/nonexistent.qcow2"),
    usage("create", "-d", "libvirt", *LOCAL, "w", text="--local-bridge is not an option of the libvirt driver"),
]

COMMANDS = [
    usage("create", "-d", "warp", "w", text="unknown driver 'warp' (choose from local, libvirt, ec2"),
    usage("create", "-d", "", "w", text="unknown driver ''"),
    usage("frobnicate", text="No such command 'frobnicate'"),
    usage("create", "--no-such-flag", "w", text="No such option '--no-such-flag'"),
    usage("ls", "--no-such-flag", text="No such option"),
    usage("create", text="Missing argument 'NAMES...'"),
    usage("rm", text="Missing argument 'NAMES...'"),
    usage("ls", "--filter", "junk", text="--filter 'junk': use name=GLOB"),
    usage("ls", "--filter", "colour=red", text="--filter 'colour=red'"),
    usage("ls", "--format", "xml", text="--format 'xml': use table, json or a Go template"),
    usage("ls", "--format", "{{.Nmae}}", text="unknown field .Nmae"),
    usage("inspect", "--format", "{{if .Name}}", "m1", text="is not closed with '{{end}}'"),
    usage("env", "--shell", "tcsh", "web1", text="Invalid value for '--shell'"),
    usage("env", text="env needs a machine name (or --unset)"),
    usage("rm", "web1", text="refusing to remove without confirmation: pass -y"),
    usage("scp", "/etc/hostname", "/tmp/nowhere", text="one side of scp must be MACHINE:PATH"),
    failure("scp", "ghost:/etc/hostname", "/tmp/nowhere", text="no machine named 'ghost'"),
    failure("scp", "/etc/hostname", "ghost:/tmp", text="no machine named 'ghost'"),
    usage("scp", "web1:/etc/hostname", text="Missing argument 'DESTINATION'"),
    usage("scp", "/nonexistent/file", "web1:/tmp", text="/nonexistent/file: no such file or directory"),
    usage("mount", "/srv", text="/srv: not MACHINE:PATH"),
    failure("mount", "ghost:/srv", text="no machine named 'ghost'"),
    usage("mount", "web1:srv", text="web1:srv: name a mount point"),
    usage("mount", "web1:/srv", "/nonexistent/dir", text="/nonexistent/dir: no such directory"),
    usage("mount", "-u", "web1:/srv", "/tmp", text="/tmp: no directory of web1 is mounted there"),
    usage("provision", "--check", "--diff", text="Missing argument 'NAMES...'"),
    usage("provision", "--tags", "kernel,kernle", "web1", text="--tags: 'kernle' is not a tag of the roles"),
]

MISSING = [failure(*argv, "ghost", text="no machine named 'ghost'") for argv in (
    ("ssh",), ("ip",), ("status",), ("inspect",), ("url",), ("config",), ("env",), ("inventory", "--host"),
    ("provision", "--tags", "kernel,engine"), ("version",),
)] + [failure(*argv, "ghost", text="ghost: no machine named 'ghost'") for argv in (
    ("rm", "-y"), ("rm", "-f"), ("stop",), ("start",), ("kill",), ("restart",), ("upgrade",), ("regenerate-certs",),
    ("regenerate-certs", "-f"),
)] + [
    failure("rm", "-y", "ghost", "ghost2", text="ghost2: no machine named 'ghost2'", lines=2),
    failure("inspect", "web1", text="corrupt config.json", setup=damaged_record),
]

ENVIRONMENT = [
    usage("create", "w", env={"PYMACHINE_LOCAL_SUBNET": "junk"}, text="local-subnet"),
    usage("create", "w", env={"PYMACHINE_LOCAL_BRIDGE": "not a bridge"}, text="local-bridge"),
    usage("create", "w", env={"PYMACHINE_LOCAL_RELEASE": "../etc"}, text="local-release"),
    usage("create", "w", env={"PYMACHINE_LOCAL_IMAGE": "gopher://x/y"}, text="unsupported URL scheme"),
    usage("create", "-d", "libvirt", "w", env={"PYMACHINE_LIBVIRT_CPUS": "many"},
          text="PYMACHINE_LIBVIRT_CPUS: 'many' is not a valid int"),
    usage("create", "-d", "libvirt", "w", env={"PYMACHINE_LIBVIRT_MEMORY": "0x10"}, text="is not a valid int"),
    usage("create", "-d", "libvirt", "w", env={"PYMACHINE_LIBVIRT_DOMAIN_TYPE": "xen"}, text="is not one of"),
    failure("create", "w", env={"PYMACHINE_ROLES_PATH": "/nonexistent/roles"}, text="role 'kernel' not found"),
]

ROLES_CASES = [
    failure("create", "w", text="roles/bridge/defaults/main.yml:2: YAML syntax error",
            setup=broken_roles(write("bridge/defaults/main.yml", "bridge: [unclosed\n"))),
    failure("create", "w", text="unknown module 'frobnicate'",
            setup=broken_roles(append_task("- name: Frob\n  frobnicate: {x: 1}\n"))),
    failure("create", "w", text="unknown keyword 'colour'",
            setup=broken_roles(append_task("- name: Say\n  debug: {msg: hi}\n  colour: red\n"))),
    failure("create", "w", text="engine/templates/daemon.json.j2:1: template syntax error",
            setup=broken_roles(write("engine/templates/daemon.json.j2", "{% if %}\n"))),
    failure("create", "w", text="daemon.json.j2:1: template syntax error: No filter named 'frobnicate'",
            setup=broken_roles(write("engine/templates/daemon.json.j2", "{{ engine_opts | frobnicate }}\n"))),
    failure("create", "w", text="template syntax error in 'ansible_facts[':",
            setup=broken_roles(append_task("- name: Odd\n  debug: {msg: hi}\n  when: ansible_facts[\n"))),
    failure("create", "w", text="No filter named 'no_such_filter'",
            setup=broken_roles(append_task("- name: Odd\n  debug:\n    msg: \"{{ 1 | no_such_filter }}\"\n"))),
    failure("create", "w", text="could not find src 'daemon.json.j2'",
            setup=broken_roles(remove("engine/templates/daemon.json.j2"))),
    failure("create", "w", text="roles/kernel/defaults/main.yml:1: YAML syntax error: a mapping key must be a scalar",
            setup=broken_roles(write("kernel/defaults/main.yml", "? [a, b]\n: c\n"))),
    failure("create", "w", text="roles/kernel/defaults/main.yml: not UTF-8 text",
            setup=broken_roles(lambda roles: (roles / "kernel/defaults/main.yml").write_bytes(b"a: \xff\n"))),
    failure("create", "w", text="task file must be a list of tasks",
            setup=broken_roles(write("tls/tasks/main.yml", "name: not a list\n"))),
    # An existing machine: the roles are refused before the machine is even looked at.
    failure("provision", "web1", text="unknown module 'frobnicate'",
            setup=broken_roles(append_task("- name: Frob\n  frobnicate: {x: 1}\n"))),
    failure("upgrade", "web1", text="YAML syntax error",
            setup=broken_roles(write("bridge/defaults/main.yml", "bridge: [unclosed\n"))),
]

CORPUS = NAMES + ENGINE + LOCAL_DRIVER + LIBVIRT_DRIVER + COMMANDS + MISSING + ENVIRONMENT + ROLES_CASES


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its contents (None for a directory, a device node or a socket)."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
            for p in sorted(root.rglob("*"))}


@dataclass
class Outcome:
    returncode: int
    stderr: str


def run(argv: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "machine", *argv], env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def invoke(argv: tuple[str, ...], env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
           capsys: pytest.CaptureFixture[str]) -> Outcome:
    """The CLI's main() as `pymachine ARGV` runs it, with `env` as the whole environment."""
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["pymachine", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    return Outcome(exited.value.code, capsys.readouterr().err)


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A store with one machine (web1, its record only), and an environment with no tools and no user setting."""
    with Store(tmp_path / "home").reserve("web1", "local", {"local_bridge": "pmtc9"}):
        pass
    (tmp_path / "bin").mkdir()
    return tmp_path


def clean_env(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYMACHINE_", "DOCKER_"))}
    return {**env, "PYMACHINE_HOME": str(scratch / "home"), "HOME": str(scratch), "PATH": str(scratch / "bin")}


def assert_refused(proc: Outcome | subprocess.CompletedProcess[str], code: int, text: str, lines: int = 1) -> None:
    errors = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, proc.stderr
    assert len(errors) == lines and all(e.startswith("pymachine: error: ") for e in errors), proc.stderr
    assert text in proc.stderr, proc.stderr


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 60


@pytest.mark.parametrize("case", CORPUS, ids=str)
def test_bad_input_is_refused_and_changes_nothing(case: Case, scratch: Path, monkeypatch, capsys):
    env = {**clean_env(scratch), **(case.setup(scratch) if case.setup else {}), **case.env}
    before = snapshot(scratch / "home")
    proc = invoke(case.argv, env, monkeypatch, capsys)
    assert_refused(proc, case.code, case.text, case.lines)
    assert snapshot(scratch / "home") == before
    assert not (scratch / ".docker").exists()  # no docker context was made either


def test_an_unexpected_error_is_one_line_and_the_next_name_still_runs(scratch: Path, monkeypatch, capsys):
    """A failure no check foresaw (here a driver that crashes, as a bug would) is one line naming it, the traceback
    comes only with --debug, and a command over several names still goes on to the next one."""
    def crash(self: LocalDriver) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(LocalDriver, "state", crash)
    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)  # --debug lowers it
    env = clean_env(scratch)
    before = snapshot(scratch / "home")
    plain = invoke(("start", "web1", "ghost"), env, monkeypatch, capsys)
    assert_refused(plain, 1, "pymachine: error: web1: internal error: RuntimeError: simulated bug", lines=2)
    assert "(run with --debug for the traceback)" in plain.stderr
    assert "pymachine: error: ghost: no machine named 'ghost'" in plain.stderr
    debug = invoke(("--debug", "start", "web1"), env, monkeypatch, capsys)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert snapshot(scratch / "home") == before


def test_starting_a_machine_that_never_got_an_address_says_how_to_remove_it(scratch: Path):
    proc = run(("start", "web1"), clean_env(scratch))
    assert_refused(proc, 1, "was never fully created (it has no address): remove it with `pymachine rm -f web1`")
