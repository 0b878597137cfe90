"""A ready engine host (create + engine + TLS) from the engine cache: without it, cold (layer missing), warm,
and 8 warm creates at once (one `pymachine create` of 8 names, in parallel).

Run as root: `.venv/bin/python bench/engine_cache.py [--rounds N] [--bridge BR --subnet CIDR]`. Prints a Markdown
table. Uses an image cache of its own with the base images of $PYMACHINE_TEST_CACHE linked in (build that base
first, e.g. with the test suite), so "cold" really builds the layer; engine from the distribution (`distro`).

- ready: wall time of `pymachine create --engine-install distro NAME` until it returns: booted, provisioned,
  the engine answering mutual TLS on 2376.
- disk: what the machine's own layer (its upper directory) holds once ready.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE = os.environ.get("PYMACHINE_TEST_CACHE", "/var/tmp/pymachine-test-cache")
ENGINE = ("--engine-install", "distro")


def pymachine(env: dict[str, str], *args: str) -> float:
    """Run pymachine; the seconds it took."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "machine", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pymachine {' '.join(args)} failed:\n{proc.stderr}")
    return time.monotonic() - start


def upper_mib(home: str, name: str) -> float:
    out = subprocess.run(["du", "-sb", f"{home}/machines/{name}/layer/upper"], capture_output=True, text=True).stdout
    return int(out.split()[0]) / 2**20


def linked_cache(directory: Path) -> Path:
    """An image cache holding the shared base images (linked) and no engine layer."""
    rootfs = directory / "local/rootfs"
    rootfs.mkdir(parents=True)
    for base in Path(CACHE, "local/rootfs").iterdir():
        if (base / "complete").exists():
            (rootfs / base.name).symlink_to(base)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fleet", type=int, default=8)
    parser.add_argument("--bridge", default="pmbench1")
    parser.add_argument("--subnet", default="10.231.252.0/24")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home, tempfile.TemporaryDirectory(dir="/var/tmp") as cache:
        env = {**os.environ, "PYMACHINE_HOME": home, "PYMACHINE_CACHE": str(linked_cache(Path(cache))),
               "PYMACHINE_LOCAL_BRIDGE": args.bridge, "PYMACHINE_LOCAL_SUBNET": args.subnet}
        rows = []
        try:
            without = pymachine(env | {"PYMACHINE_LOCAL_ENGINE_LAYER": "false"}, "create", *ENGINE, "plain")
            rows.append(("without the engine cache (packages installed in the machine)", without,
                         upper_mib(home, "plain")))
            pymachine(env, "rm", "-y", "plain")
            rows.append(("cold: the layer is built first (apt-get update + install, once)",
                         pymachine(env, "create", *ENGINE, "cold"), upper_mib(home, "cold")))
            pymachine(env, "rm", "-y", "cold")  # each create starts with no other machine running
            warm, disk = [], 0.0
            for i in range(args.rounds):
                warm.append(pymachine(env, "create", *ENGINE, f"warm{i}"))
                disk = upper_mib(home, f"warm{i}")
                pymachine(env, "rm", "-y", f"warm{i}")
            rows.append((f"warm (median of {args.rounds})", statistics.median(warm), disk))
            names = [f"fleet{i}" for i in range(args.fleet)]
            rows.append((f"{args.fleet} warm creates at once (`pymachine create` of {args.fleet} names), all ready",
                         pymachine(env, "create", *ENGINE, *names), upper_mib(home, names[0])))
        finally:
            left = subprocess.run([sys.executable, "-m", "machine", "ls", "-q"], env=env, capture_output=True,
                                  text=True).stdout.split()
            if left:
                subprocess.run([sys.executable, "-m", "machine", "rm", "-f", *left], env=env, capture_output=True)
    print("| a ready engine host (create + engine + TLS), local driver | seconds | machine's own layer |")
    print("|---|---|---|")
    for what, seconds, mib in rows:
        print(f"| {what} | {seconds:.1f} s | {mib:.1f} MiB |")


if __name__ == "__main__":
    main()
