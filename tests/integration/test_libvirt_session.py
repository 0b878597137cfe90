"""An unprivileged user's libvirt machine: `qemu:///session`, the user's own libvirtd, QEMU running as the user.

The user is `nobody` with a temporary home; libvirt starts the session daemon itself on first connection, and
the machine's volumes go to the `default` pool pymachine creates in the home (as virt-install would). The guest
is reached through ports QEMU forwards from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CLI
from tests.integration.conftest import machine_cli, machine_record
from tests.integration.libvirt_host import boot_image, domains, require_libvirt, virsh, volumes

pytestmark = pytest.mark.integration

URI = "qemu:///session"
USER = "nobody"


def _stop_session_daemons(runtime: Path) -> None:
    """The session's libvirtd and virtlogd (they would otherwise idle for two minutes before they exit)."""
    for pidfile in runtime.glob("libvirt/*.pid"):
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


@pytest.fixture(scope="module")
def cli() -> Iterator[CLI]:
    require_libvirt()
    user = pwd.getpwnam(USER)
    image, digest = boot_image()  # world-readable, in the shared test cache
    home = Path(tempfile.mkdtemp(prefix="pmtest-session-"))  # outside pytest's root-only tmp
    runtime = home / "run"
    runtime.mkdir(mode=0o700)
    for path in (home, runtime):
        os.chown(path, user.pw_uid, user.pw_gid)
    prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import libvirt, machine"], capture_output=True)
    assert probe.returncode == 0, f"{USER} cannot run {sys.executable} with pymachine: {probe.stderr!r}"
    try:
        yield from machine_cli(
            home / "pymachine",
            prefix,
            HOME=str(home),
            XDG_RUNTIME_DIR=str(runtime),
            PYMACHINE_CACHE=str(home / "cache"),
            PYMACHINE_LIBVIRT_URI=URI,
            PYMACHINE_LIBVIRT_NETWORK="user",
            PYMACHINE_LIBVIRT_DOMAIN_TYPE="qemu",
            PYMACHINE_LIBVIRT_IMAGE=str(image),
            PYMACHINE_LIBVIRT_IMAGE_SHA256=digest,
            PYMACHINE_LIBVIRT_MEMORY="1024",
            PYMACHINE_LIBVIRT_DISK_SIZE="4",
        )
    finally:
        _stop_session_daemons(runtime)
        shutil.rmtree(home, ignore_errors=True)


def _owner_of_qemu(domain: str) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"guest={domain}," in (proc / "cmdline").read_bytes().decode(errors="replace"):
                return proc.stat().st_uid
        except OSError:
            pass
    return None


def test_an_unprivileged_user_runs_a_machine_on_the_session_libvirtd(cli):
    assert virsh(URI, "pool-list", "--all", like=cli).stdout.strip() == ""  # a new user: no pool yet
    cli("create", "--driver", "libvirt", "--no-provision", "s1", timeout=900)
    assert cli("status", "s1").stdout.strip() == "Running"
    assert cli("ssh", "s1", "--", "hostname").stdout.strip() == "s1"
    assert _owner_of_qemu("s1") == pwd.getpwnam(USER).pw_uid
    # The `default` pool was made in the user's home, and holds the machine's overlay and seed.
    r = machine_record(cli, "s1")["resources"]
    images = Path(cli.env["HOME"]) / ".local/share/libvirt/images"
    assert r["pool"] == "default" and (images / r["disk"]).is_file() and (images / r["seed"]).is_file()

    cli("rm", "-y", "s1")
    assert domains(URI, like=cli) == []
    assert volumes(URI, "default", like=cli) == [
        f"pymachine-base-{cli.env['PYMACHINE_LIBVIRT_IMAGE_SHA256'][:16]}.qcow2"]
    assert not (images / r["disk"]).exists() and not (images / r["seed"]).exists()
    assert _owner_of_qemu("s1") is None
