"""Every role's molecule scenario passes `molecule test` (syntax, create, converge, idempotence, verify, destroy)
under real ansible-core, on pymachine local machines made by the molecule-pymachine driver."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CLI
from tests.integration.conftest import machine_cli
from tests.integration.test_inventory import ansible_env

pytestmark = pytest.mark.integration

ROLES = Path(__file__).resolve().parents[2] / "roles"
SCENARIOS = sorted(p.parents[2].name for p in ROLES.glob("*/molecule/default/molecule.yml"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# One scenario alone leaves a core idle (it mostly waits on SSH round trips, apt and service restarts): on
# 2 cores, one after the other took ~8 min, three at once 5.2 min, all five at once no less (5.4 min).
CONCURRENT = 3


@dataclass
class Outcome:
    returncode: int
    log: str
    seconds: float
    machines_left: list[str]


def test_every_role_has_a_scenario():
    assert sorted(p.parents[1].name for p in ROLES.glob("*/tasks/main.yml")) == SCENARIOS


def scenario_env(cli: CLI, tmp: Path) -> dict[str, str]:
    """Molecule's environment for a scenario whose machines live in `cli`'s home: the CLI's environment carries
    the test bridge, subnet and cache to the driver, which keeps the machines in the scenario's own home
    (`pymachine` in the ephemeral directory), the CLI's."""
    env = {**ansible_env(cli, tmp), "MOLECULE_EPHEMERAL_DIRECTORY": str(cli.home.parent), "NO_COLOR": "1"}
    env.pop("PYMACHINE_HOME")
    return env


def molecule_test(role: str, tmp: Path) -> Outcome:
    """`molecule test` in roles/<role>, with its machines in a pymachine home of its own under `tmp`.
    Whatever molecule's own destroy leaves behind (a timeout, a crash) is removed before this returns."""
    with contextlib.contextmanager(machine_cli)(tmp / "ephemeral" / "pymachine") as cli:
        env = scenario_env(cli, tmp)
        start = time.monotonic()
        try:
            proc = subprocess.run(["molecule", "test"], cwd=ROLES / role, env=env, capture_output=True, text=True,
                                  timeout=900)
            returncode, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as timeout:
            returncode, log = -1, f"molecule test timed out:\n{timeout.stdout}\n{timeout.stderr}"
        return Outcome(returncode, ANSI.sub("", log), time.monotonic() - start, cli("ls", "-q").stdout.split())


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> Iterator[dict[str, Future[Outcome]]]:
    """The selected scenarios, started together (CONCURRENT at a time) when the first of them is tested."""
    selected = sorted({item.callspec.params["role"] for item in request.session.items
                       if item.originalname == "test_molecule"})
    with ThreadPoolExecutor(CONCURRENT) as pool:
        yield {role: pool.submit(molecule_test, role, tmp_path_factory.mktemp(f"molecule-{role}"))
               for role in selected}


@pytest.mark.parametrize("role", SCENARIOS)
def test_molecule(role: str, outcomes: dict[str, Future[Outcome]]) -> None:
    outcome = outcomes[role].result()
    print(f"molecule test {role}: {outcome.seconds:.0f} s")
    log = outcome.log
    # The first failed task says why; the recap at the end only that something failed.
    assert outcome.returncode == 0, log[max(0, log.find("fatal:") - 300):][:6000] if "fatal:" in log else log[-6000:]
    for step in ("syntax", "create", "converge", "idempotence", "verify", "destroy"):
        # "[default > verify] Executed: Successful" without colour ("default ➜ verify: …" in some versions).
        assert re.search(rf"\b{step}(:|\]) Executed: Successful", log), f"molecule did not run {step}:\n{log[-3000:]}"
    assert outcome.machines_left == []  # molecule's destroy removed the machine
