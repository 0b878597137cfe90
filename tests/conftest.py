"""Shared test helpers: run the real CLI as a user would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass
class CLI:
    """The `pymachine` command with its own home (and a shared image cache)."""

    env: dict[str, str]
    # A wrapper for every call, e.g. `ip netns exec NS` for machines that live in a network namespace.
    prefix: list[str] = field(default_factory=list)

    def __call__(self, *args: str, check: bool = True, input: str | None = None,
                 timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.prefix, sys.executable, "-m", "machine", *args], env=self.env,
                              capture_output=True, text=True, input=input, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pymachine {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def run(self, prefix: list[str], *args: str) -> subprocess.CompletedProcess[str]:
        """Run pymachine once under a wrapper command (e.g. `unshare --user`)."""
        return subprocess.run([*prefix, *self.prefix, sys.executable, "-m", "machine", *args], env=self.env,
                              capture_output=True, text=True, timeout=600)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*self.prefix, sys.executable, "-m", "machine", *args], env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @property
    def home(self) -> Path:
        return Path(self.env["PYMACHINE_HOME"])


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    env = {**os.environ, "PYMACHINE_HOME": str(tmp_path / "home")}
    env.pop("DOCKER_HOST", None)
    return CLI(env)


def pytest_configure(config: pytest.Config) -> None:
    """Tests press Ctrl-C (in this process, and to the commands they start). A suite started in the background by
    a non-interactive shell (`cmd &`) inherits SIGINT ignored: Python then never raises KeyboardInterrupt and
    those tests would wait for it for good. Handled here, SIGINT is also back to its default in the commands."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist (`scripts/test` runs integration tests on several workers), keep each module on one
    worker, so that its module-scoped machines boot once, and every libvirt module on the same one: they share
    one libvirtd for the session."""
    for item in items:
        module = item.path.stem
        item.add_marker(pytest.mark.xdist_group("libvirt" if module.startswith("test_libvirt") else module))
    # xdist hands the groups out in this order. The libvirt group (TCG boots, one after another) is the longest:
    # first, it runs beside all the others instead of starting late and finishing alone.
    items.sort(key=lambda item: not item.path.stem.startswith("test_libvirt"))
