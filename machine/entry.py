"""The program's entry point. Shell prompts, aliases and scripts run a few commands over and over (`pymachine ip
web1`, `url`, `status`, `config`, `env web1`, `active`, `ls`, and `provision web1` to check a machine's
configuration); in that plain form (no option) they are answered here, without click: loading the full command line
takes longer than the answer. Anything else, and these commands with an option or `--help`, goes to machine.cli,
which answers them through the same functions below."""

from __future__ import annotations

import gc
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from machine import commands, failure, shellenv, ui
from machine.names import validate_name
from machine.store import Store


def one(query: str, name: str) -> None:
    """`ip`, `url`, `status`, `config`: what the query says of one machine."""
    answer = getattr(commands, query)(Store(), name)
    print(answer if isinstance(answer, str) else "\n".join(answer))


def env(name: str, shell: str | None = None) -> None:
    """The commands that point the docker CLI at a machine, in the syntax of the user's shell."""
    print(shellenv.render(commands.env(Store(), name), shell or shellenv.detect(), f" {name}"))
    overrides = shellenv.ca_bundle_overrides()
    if overrides:
        ui.err(f"note: {' and '.join(overrides)} replace the machine's CA for docker-compose 1.x (Python's "
               f"requests): run it as `env -u REQUESTS_CA_BUNDLE -u CURL_CA_BUNDLE docker-compose …`")


def active() -> None:
    print(commands.active(Store()))


def provision(name: str) -> None:
    from machine import report  # the role engine: only this command of the plain ones needs it

    commands.provision(Store(), name, reporter=report.tasks())


def apply(file: Path, prune: bool = False, recreate: bool = False, dry_run: bool = False,
          parallel: int | None = None) -> None:
    """Show the fleet file's plan and carry it out (docs/fleet.md); exit 1 if a machine failed."""
    store = Store()
    plan = commands.apply.plan(store, commands.apply.load_fleet(file), prune=prune, recreate=recreate,
                               parallel=parallel)
    for step in plan.steps:
        print(f"  {step.action:<16} {step.name}" + (f"  ({step.reason})" if step.reason else ""))
    sys.stdout.flush()  # the plan before any error about it, in a log that takes both streams
    if not plan.changes:
        count = len(plan.fleet.machines)
        print(f"{count} machine{'s' * (count != 1)} unchanged")
        return
    commands.apply.check(plan)
    if dry_run:
        return

    def show(outcome: commands.apply.Outcome) -> None:
        step = outcome.step
        if outcome.error:
            ui.err(f"error: {step.name}: {step.action} failed: {failure.describe(outcome.error)}")
        else:
            ui.out(f"done {step.action} {step.name}" + (f": {outcome.detail}\n" if outcome.detail else "\n"))

    outcomes = commands.apply.execute(store, plan, show, parallel)
    failed = sum(1 for o in outcomes if o.error)
    counts = Counter(commands.apply.DONE[o.step.action] for o in outcomes if not o.error)
    unchanged = sum(1 for s in plan.steps if s.action == commands.apply.UNCHANGED)
    summary = [f"{n} {done}" for done, n in counts.items()] + [f"{unchanged} unchanged"] * bool(unchanged)
    print(", ".join(summary + [f"{failed} failed"] * bool(failed)) or "nothing done")
    if failed:
        raise SystemExit(1)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """`ls` rows as docker-machine's table."""
    return ui.columns([("NAME", "ACTIVE", "DRIVER", "STATE", "URL", "ERRORS"),
                       *((r["name"], "*" if r["active"] else "-", r["driver"], r["state"], r["url"], r["error"])
                         for r in rows)])


def _ls() -> None:
    print(table(commands.ls(Store())))


# (command, number of arguments) -> what answers it; the arguments are machine names, but for the commands of
# _FILES (`apply FLEET.yaml`: a script or CI job's fleet check, where loading click is a sixth of the no-op).
_PLAIN: dict[tuple[str, int], Callable[..., None]] = {
    **{(query, 1): lambda name, q=query: one(q, name) for query in ("ip", "url", "status", "config")},
    ("env", 1): env,
    ("provision", 1): provision,
    ("active", 0): active,
    ("ls", 0): _ls,
    ("apply", 1): lambda file: apply(Path(file)),
}
_FILES = frozenset({"apply"})


def main() -> None:
    failure.stop_on_signals()
    try:
        _answer(sys.argv[1:])
    finally:
        # The process ends here: no garbage collection is worth its cost, and the interpreter's at exit would walk
        # every object the command loaded (the role engine, jinja2, paramiko: ~0.1 s after a provisioning run).
        gc.freeze()


def _answer(args: list[str]) -> None:
    plain = _PLAIN.get((args[0], len(args) - 1)) if args and not any(a.startswith("-") for a in args) else None
    if plain is None:
        from machine import cli

        cli.main()
        return
    try:
        for name in args[1:] if args[0] not in _FILES else ():
            validate_name(name)
        plain(*args[1:])
    except (KeyboardInterrupt, Exception) as e:  # as machine.cli reports them: one line, never a traceback
        failure.exit_with(e)
