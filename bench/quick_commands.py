"""The quick commands that run in shell prompts, aliases and scripts (env, ip, url, status, active, ls), on a store
of 10 local machines, against the interpreter's own start (`python -c pass`) as the floor. Target: each <= 80 ms.

Run as root: `.venv/bin/python bench/quick_commands.py [--rounds N]`. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import median_seconds  # bench/, the script's own directory

BRIDGE, SUBNET = "pmbench0", "10.231.251.0/24"
CACHE = os.environ.get("PYMACHINE_TEST_CACHE", "/var/tmp/pymachine-test-cache")
MACHINES = [f"q{i}" for i in range(1, 11)]
PYMACHINE = str(Path(sys.executable).parent / "pymachine")  # the entry point users run
TARGET_MS = 80


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    rounds = parser.parse_args().rounds
    # As pip leaves an installed package: byte-compiled (a source tree run with PYTHONDONTWRITEBYTECODE set, as
    # here, would otherwise compile every module on every run and measure the compiler).
    for package in ("machine", "drivers"):  # machine/drivers is a link to drivers/, which compileall skips
        compileall.compile_dir(Path(__file__).resolve().parent.parent / package, quiet=1)
    with tempfile.TemporaryDirectory(prefix="pm-quick-") as home:
        env = {**os.environ, "PYMACHINE_HOME": home, "PYMACHINE_CACHE": CACHE, "PYMACHINE_LOCAL_BRIDGE": BRIDGE,
               "PYMACHINE_LOCAL_SUBNET": SUBNET}

        def run(*args: str) -> str:
            return subprocess.run([PYMACHINE, *args], env=env, check=True, capture_output=True, text=True).stdout

        try:
            run("create", "--no-provision", "--engine-install", "distro", *MACHINES)
            run("provision", MACHINES[0])  # `env` needs the engine's certificates
            env["DOCKER_HOST"] = run("url", MACHINES[0]).strip()  # `active` finds one
            floor = median_seconds(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), rounds)
            rows = []
            for command in (["env", "q1"], ["ip", "q1"], ["url", "q1"], ["status", "q1"], ["active"], ["ls"]):
                seconds = median_seconds(lambda c=command: run(*c), rounds)
                rows.append((" ".join(command), seconds))
        finally:
            subprocess.run([PYMACHINE, "rm", "-f", *MACHINES], env=env, capture_output=True)
    print(f"quick commands on a store of {len(MACHINES)} local machines (median of {rounds}; "
          f"floor `python -c pass`: {floor * 1000:.0f} ms)\n")
    print("| command | time | over the floor | target |")
    print("|---|---|---|---|")
    for command, seconds in rows:
        verdict = "met" if seconds * 1000 <= TARGET_MS else "missed"
        print(f"| `pymachine {command}` | {seconds * 1000:.0f} ms | {(seconds - floor) * 1000:.0f} ms | "
              f"≤ {TARGET_MS} ms: {verdict} |")


if __name__ == "__main__":
    main()
