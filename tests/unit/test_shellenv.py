"""`pymachine env` output, evaluated by the real shells it is written for."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from machine import shellenv
from machine.errors import UsageError

# A home with a space in it: the values must survive the shell's word splitting.
VALUES = {"DOCKER_HOST": "tcp://10.0.0.2:2376", "DOCKER_TLS_VERIFY": "1",
          "DOCKER_CERT_PATH": "/home/a user/.pymachine/machines/web1"}

# A stand-in `pymachine` printing what `pymachine env` would: the test runs the very line the output tells the
# user to run. Then `env`, an external command, shows what the shell exports to programs such as docker.
FAKE_COMMAND = {
    "fish": "function pymachine; cat {file}; end",
    "default": "pymachine() {{ cat {file}; }}",
}
# zsh is in scripts/setup's package list; a host without it skips its case rather than failing the suite.
POSIX_SHELLS = ["bash", "sh", "zsh"]


def run_hint(shell: str, text: str, tmp_path: Path, env: dict[str, str]) -> dict[str, str]:
    """Evaluate `text` the way its own last line says, in `shell`; the DOCKER_ variables the shell then exports."""
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    file = tmp_path / "env.out"
    file.write_text(text + "\n")
    hint = text.splitlines()[-1].removeprefix("# ")
    assert hint.startswith(("eval $(pymachine env", "eval (pymachine env")), hint
    script = FAKE_COMMAND.get(shell, FAKE_COMMAND["default"]).format(file=file) + "\n" + hint + "\nenv\n"
    proc = subprocess.run([shell, "-c", script], capture_output=True, text=True, timeout=30, cwd=tmp_path,
                          env={"PATH": os.environ["PATH"], **env})
    assert proc.returncode == 0, proc.stderr
    exported = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return {k: v for k, v in exported.items() if k.startswith("DOCKER_")}


@pytest.mark.parametrize("shell", [*POSIX_SHELLS, "fish"])
def test_each_shell_really_sets_and_unsets_the_variables(shell, tmp_path):
    assert run_hint(shell, shellenv.render(VALUES, shell, " web1"), tmp_path, {}) == VALUES
    unset = shellenv.render(dict.fromkeys(VALUES), shell, " --unset")
    assert run_hint(shell, unset, tmp_path, {**VALUES, "DOCKER_CONFIG": "/keep"}) == {"DOCKER_CONFIG": "/keep"}


# A home holding what each shell would otherwise expand, run or split (eval $(…) joins words with one space).
TRICKY = {**VALUES, "DOCKER_CERT_PATH": '/tmp/my $HOME $(touch x) `id` "q" \\b\\$ & ; c/machines/web1'}


@pytest.mark.parametrize("shell", [*POSIX_SHELLS, "fish"])
def test_a_home_of_any_characters_is_set_literally(shell, tmp_path):
    assert run_hint(shell, shellenv.render(TRICKY, shell, " web1"), tmp_path, {"HOME": "/root"}) == TRICKY
    assert not (tmp_path / "x").exists()


def test_windows_shells_escape_what_they_would_expand():
    value = {"DOCKER_CERT_PATH": 'C:\\my $HOME `x` "q" & a|b <c> (d) ^e'}
    assert shellenv.render(value, "powershell", "").splitlines()[0] == \
        '$Env:DOCKER_CERT_PATH = "C:\\my `$HOME ``x`` `"q`" & a|b <c> (d) ^e"'
    assert shellenv.render(value, "cmd", "").splitlines()[0] == \
        'SET DOCKER_CERT_PATH=C:\\my $HOME `x` "q" ^& a^|b ^<c^> ^(d^) ^^e'


# PowerShell and cmd cannot be installed on this Debian host: their syntax is only compared as text.
@pytest.mark.parametrize(
    ("shell", "expected"),
    [
        ("powershell", ['$Env:DOCKER_HOST = "tcp://10.0.0.2:2376"', '$Env:DOCKER_TLS_VERIFY = "1"',
                        '$Env:DOCKER_CERT_PATH = "/home/a user/.pymachine/machines/web1"',
                        "# Run this command to configure your shell:",
                        "# & pymachine env web1 | Invoke-Expression"]),
        ("cmd", ["SET DOCKER_HOST=tcp://10.0.0.2:2376", "SET DOCKER_TLS_VERIFY=1",
                 "SET DOCKER_CERT_PATH=/home/a user/.pymachine/machines/web1",
                 "REM Run this command to configure your shell:",
                 "REM @FOR /f \"tokens=*\" %i IN ('pymachine env web1') DO @%i"]),
    ],
)
def test_windows_shell_syntax(shell, expected):
    assert shellenv.render(VALUES, shell, " web1").splitlines() == expected


def test_windows_shell_unset_syntax():
    assert shellenv.render({"DOCKER_HOST": None}, "powershell", " --unset").splitlines()[0] == \
        "Remove-Item Env:\\\\DOCKER_HOST"
    assert shellenv.render({"DOCKER_HOST": None}, "cmd", " --unset").splitlines()[0] == "SET DOCKER_HOST="


def test_unknown_shell_and_detection(monkeypatch):
    with pytest.raises(UsageError, match="--shell: 'tcsh' is not one of bash, zsh, sh, fish, powershell, cmd"):
        shellenv.render(VALUES, "tcsh", "")
    monkeypatch.setenv("SHELL", "/usr/bin/fish")
    assert shellenv.detect() == "fish"
    monkeypatch.setenv("SHELL", "/bin/tcsh")
    assert shellenv.detect() == "bash"
