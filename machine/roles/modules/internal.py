"""Modules that only evaluate variables: set_fact, assert, debug, fail. They never touch the host."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from machine.roles.modules.base import SHOWN, Arg, Context, Module, ModuleFailure
from machine.roles.templating import TemplateFailure, invalid_name


class SetFact(Module):
    names = ("set_fact",)
    open_args = True

    def run(self) -> dict[str, Any]:
        facts = {k: v for k, v in self.params.items() if k != "cacheable"}
        if not facts:  # Ansible's words, here and below
            raise ModuleFailure("No key/value pairs provided, at least one is required for this action to succeed")
        for name in facts:
            if problem := invalid_name(name):
                raise ModuleFailure(problem)
        return {"changed": False, "ansible_facts": facts}


class Assert(Module):
    names = ("assert",)
    args: ClassVar[dict[str, Arg]] = {
        # Not type "list": that would split one condition at its commas (`x in ['a', 'b']`).
        "that": Arg(required=True, type="raw"), "fail_msg": Arg(aliases=("msg",)),
        "success_msg": Arg(default="All assertions passed"), "quiet": Arg(default=False, type="bool"),
    }

    def run(self) -> dict[str, Any]:
        p = self.params
        for expr in p["that"] if isinstance(p["that"], list) else [p["that"]]:
            if not self.ctx.templar.condition(expr, self.ctx.vars):
                return {"changed": False, "failed": True, "assertion": expr, "evaluated_to": False,
                        "msg": p["fail_msg"] or "Assertion failed"}
        # As Ansible's: `quiet` keeps the message in the result and only stops it being shown.
        return {"changed": False, "msg": p["success_msg"], **({} if p["quiet"] else {SHOWN: str(p["success_msg"])})}


class Debug(Module):
    names = ("debug",)
    args: ClassVar[dict[str, Arg]] = {"msg": Arg(default="Hello world!"), "var": Arg(type="str"),
                                      "verbosity": Arg(default=0, type="int")}

    def __init__(self, ctx: Context, args: Mapping[str, Any]) -> None:
        if "msg" in args and "var" in args:  # `msg` has a default: only the arguments tell it was given
            raise ModuleFailure("parameters are mutually exclusive: msg|var")  # Ansible's words
        super().__init__(ctx, args)

    def run(self) -> dict[str, Any]:
        p = self.params
        if p["verbosity"] > 0:
            # pymachine has no -v: it shows what ansible-playbook shows without it (verbosity 0).
            return {"changed": False, "skipped": True, "skipped_reason": "Verbosity threshold not met."}
        if p["var"] is not None:
            try:
                value = self.ctx.templar.template("{{ " + p["var"] + " }}", self.ctx.vars)
            except TemplateFailure:
                value = "VARIABLE IS NOT DEFINED!"
            return {"changed": False, p["var"]: value, SHOWN: f"{p['var']}: {value}"}  # as Ansible's: no msg
        # As Ansible's: a msg that templates to None stays None.
        return {"changed": False, "msg": p["msg"], SHOWN: str(p["msg"])}


class Fail(Module):
    names = ("fail",)
    args: ClassVar[dict[str, Arg]] = {"msg": Arg(default="Failed as requested from task")}

    def run(self) -> dict[str, Any]:
        return {"changed": False, "failed": True, "msg": self.params["msg"]}
