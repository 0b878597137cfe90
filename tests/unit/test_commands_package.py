"""machine.commands imports each command's module on first use: every name must resolve to what it names."""

from __future__ import annotations

import importlib
import inspect
import types
from pathlib import Path

from machine import commands


def test_every_name_resolves_and_none_is_shadowed_by_a_module():
    modules = {p.stem for p in Path(commands.__file__).parent.glob("*.py")} - {"__init__"}
    for name in commands.__all__:
        importlib.import_module(f"machine.commands.{commands._MODULES[name]}")  # sets the package's attributes
        value = getattr(commands, name)
        if name in commands._SUBMODULES:
            assert isinstance(value, types.ModuleType)
        else:
            assert name not in modules, f"a module of machine.commands is named like the command {name!r}"
            assert not inspect.ismodule(value), name
