import os
import subprocess

import pytest

from machine import shellenv
from machine.errors import UsageError

VALUES = {"DOCKER_HOST": "tcp://10.0.0.2:2376", "DOCKER_TLS_VERIFY": "1"}


@pytest.mark.parametrize(
    ("shell", "expected"),
    [
        ("bash", 'export DOCKER_HOST="tcp://10.0.0.2:2376"'),
        ("fish", 'set -gx DOCKER_HOST "tcp://10.0.0.2:2376";'),
        ("powershell", '$Env:DOCKER_HOST = "tcp://10.0.0.2:2376"'),
        ("cmd", "SET DOCKER_HOST=tcp://10.0.0.2:2376"),
    ],
)
def test_each_shell_syntax(shell, expected):
    assert shellenv.render(VALUES, shell, " web1").splitlines()[0] == expected


def test_unset_and_usage_hint():
    text = shellenv.render(dict.fromkeys(VALUES), "bash", " --unset")
    assert text.splitlines()[:2] == ["unset DOCKER_HOST", "unset DOCKER_TLS_VERIFY"]
    assert text.splitlines()[-1] == "# eval $(pymachine env --unset)"
    assert shellenv.render(dict.fromkeys(VALUES), "fish", "").splitlines()[0] == "set -e DOCKER_HOST;"


def test_bash_output_really_sets_the_variables():
    script = shellenv.render(VALUES, "bash", " web1") + '\necho "$DOCKER_HOST $DOCKER_TLS_VERIFY"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert out.stdout.strip() == "tcp://10.0.0.2:2376 1"


def test_unknown_shell_and_detection(monkeypatch):
    with pytest.raises(UsageError):
        shellenv.render(VALUES, "tcsh", "")
    monkeypatch.setenv("SHELL", "/usr/bin/fish")
    assert shellenv.detect() == "fish"
    monkeypatch.setenv("SHELL", "/bin/tcsh")
    assert shellenv.detect() == "bash"
