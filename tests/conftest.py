"""Shared test helpers: run the real CLI as a user would."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
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


# The modules that take longest under `scripts/test` (measured: seconds on the CI host), longest first. xdist hands a
# worker the next group once it is nearly done: started first, the long ones run beside the many short ones,
# instead of one starting last and finishing alone (scripts/test turns off xdist's own order, by test count).
_LONGEST_FIRST = ("libvirt", "test_molecule", "test_libvirt_network", "test_engine_cache", "test_ec2",
                  "test_provision_faults", "test_engine")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist (`scripts/test` runs integration tests on several workers), keep each module on one
    worker, so that its module-scoped machines boot once, and the modules that use the host's libvirtd on the
    same one: they share that daemon for the session (the network and session modules start daemons of their
    own)."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    rank = {group: i for i, group in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))  # stable: the rest keep pytest's order


def _group(item: pytest.Item) -> str:
    module = item.path.stem
    return "libvirt" if module in ("test_libvirt", "test_libvirt_journal") else module


@contextlib.contextmanager
def http_on_loopback(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` answering on 127.0.0.1 (on a port of its own, quietly) while the block runs: its base URL."""
    quiet = type("Quiet", (handler,), {"log_message": lambda *_: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
