"""A real shell executor for the role engine: `sh -c` on this host, on files under tmp_path."""

from __future__ import annotations

import getpass
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from machine.ssh import Result


class LocalShell:
    """Stands in for machine.ssh.Connection; every command really runs, and is recorded."""

    def __init__(self) -> None:
        self.endpoint = SimpleNamespace(user=getpass.getuser(), host="localhost")
        self.commands: list[str] = []

    def run(self, command: str, *, stdin: bytes | None = None, check: bool = False,
            timeout: float | None = None) -> Result:
        self.commands.append(command)
        proc = subprocess.run(["sh", "-c", command], input=stdin or b"", capture_output=True, timeout=timeout or 60)
        return Result(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


@pytest.fixture
def shell() -> LocalShell:
    return LocalShell()


@pytest.fixture
def roles(tmp_path: Path):
    """make(name, tasks=..., handlers=..., defaults=..., vars=..., meta=..., files={rel: text}) writes a role."""
    base = tmp_path / "roles"

    def make(name: str, **parts: str | dict[str, str]) -> Path:
        role = base / name
        for part in ("tasks", "handlers", "defaults", "vars", "meta"):
            if part in parts:
                (role / part).mkdir(parents=True, exist_ok=True)
                (role / part / "main.yml").write_text(textwrap.dedent(str(parts[part])).lstrip("\n"))
        for rel, text in dict(parts.get("files", {})).items():  # type: ignore[arg-type]
            (role / rel).parent.mkdir(parents=True, exist_ok=True)
            (role / rel).write_text(textwrap.dedent(text).lstrip("\n"))
        return base

    return make
