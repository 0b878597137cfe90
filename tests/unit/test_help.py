"""Every command's --help ends with one or two examples."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from machine.cli import cli


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += all_commands(command, (*prefix, name))
    return found


@pytest.mark.parametrize("command", all_commands(cli), ids=" ".join)
def test_every_commands_help_ends_with_an_example(command: tuple[str, ...]):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0
    assert re.search(r"\n  Examples?:\n(    .*pymachine.*\n){1,2}$", result.output), result.output
