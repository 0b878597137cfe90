"""`pymachine completion SHELL`, loaded in the real shells: commands, options and machine names complete."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = str(Path(sys.executable).parent)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    for name in ("web1", "web2", "db"):
        (home / "machines" / name).mkdir(parents=True)
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYMACHINE_HOME": str(home)}


def bash_completions(env: dict[str, str], *words: str) -> list[str]:
    """COMPREPLY after TAB at the end of `words`, in a real bash that sourced the script."""
    script = (f"source <(pymachine completion bash) && COMP_WORDS=({' '.join(words)}) && "
              f"COMP_CWORD={len(words) - 1} && _pymachine_completion pymachine && printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True).stdout.split()


def test_bash_completes_machine_names_commands_and_options(env):
    assert bash_completions(env, "pymachine", "ssh", "w") == ["web1", "web2"]
    assert bash_completions(env, "pymachine", "rm", "-y", "") == ["db", "web1", "web2"]
    assert "create" in bash_completions(env, "pymachine", "cr")
    assert "--engine-install" in bash_completions(env, "pymachine", "create", "--engine-i")


@pytest.mark.skipif(not shutil.which("fish"), reason="fish is not installed (scripts/setup installs it)")
def test_fish_completes_machine_names(env):
    out = subprocess.run(["fish", "-c", "pymachine completion fish | source; complete -C 'pymachine ip w'"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert [line.split("\t")[0] for line in out.splitlines()] == ["web1", "web2"]


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh is not installed (scripts/setup installs it)")
def test_zsh_loads_the_script(env):
    proc = subprocess.run(["zsh", "-c", "autoload -U compinit && compinit -u && source <(pymachine completion zsh) "
                           "&& whence -w _pymachine_completion"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "function" in proc.stdout, proc.stderr


def test_an_unknown_shell_is_refused(env):
    proc = subprocess.run(["pymachine", "completion", "tcsh"], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "tcsh" in proc.stderr and "Traceback" not in proc.stderr
