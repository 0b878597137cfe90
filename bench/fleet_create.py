"""Create and provision 1, 4 and 8 local machines in one command each; the 8 against the 1 (target: <= 2.5x).

Run as root: `.venv/bin/python bench/fleet_create.py [--sizes 1,4,8]`. Prints a Markdown table.

Each size is one `pymachine create --engine-install distro NAME1 … NAMEn` (base image cached, as it is after the
first machine) timed until it returns with every engine answering over TLS; the machines are removed between sizes.
Numbers on a shared host are inflated by whatever else runs there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

# A bridge of its own (overridable, so that two runs on one host do not share one).
BRIDGE = os.environ.get("PYMACHINE_LOCAL_BRIDGE", "pmbench1")
SUBNET = os.environ.get("PYMACHINE_LOCAL_SUBNET", "10.231.252.0/24")
CACHE = os.environ.get("PYMACHINE_TEST_CACHE", "/var/tmp/pymachine-test-cache")


def pymachine(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "machine", *args], env=env, check=True, capture_output=True)


def create_seconds(env: dict[str, str], count: int) -> float:
    names = [f"b{count}x{i}" for i in range(1, count + 1)]
    start = time.monotonic()
    pymachine(env, "create", "--engine-install", "distro", *names)
    seconds = time.monotonic() - start
    pymachine(env, "rm", "-y", *names)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,4,8", help="machine counts, comma-separated (first is the baseline)")
    sizes = [int(s) for s in parser.parse_args().sizes.split(",")]
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "PYMACHINE_HOME": home, "PYMACHINE_CACHE": CACHE,
               "PYMACHINE_LOCAL_BRIDGE": BRIDGE, "PYMACHINE_LOCAL_SUBNET": SUBNET}
        try:
            pymachine(env, "create", "--no-provision", "warm")  # builds or reuses the base; not measured
            pymachine(env, "rm", "-y", "warm")
            times = {n: create_seconds(env, n) for n in sizes}
        finally:
            names = subprocess.run([sys.executable, "-m", "machine", "ls", "-q"], env=env, capture_output=True,
                                   text=True).stdout.split()
            if names:
                pymachine(env, "rm", "-f", *names)
    base = times[sizes[0]]
    print(f"| machines in one `create` (provisioned, engine from distro) | seconds | vs {sizes[0]} |\n|---|---|---|")
    for n, seconds in times.items():
        print(f"| {n} | {seconds:.1f} | {seconds / base:.2f}x |")


if __name__ == "__main__":
    main()
