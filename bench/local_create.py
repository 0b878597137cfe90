"""Create-to-SSH of a second local machine (base cached) against the floor: a bare systemd-nspawn boot.

Run as root: `.venv/bin/python bench/local_create.py [--rounds N]`. Prints a Markdown table.

- pymachine: wall time of `pymachine create --no-provision NAME` until it returns with a pinned,
  authenticated SSH session.
- floor: the same machine's layers booted by hand (unshare + overlay mount + systemd-nspawn with the same
  flags) until sshd's banner answers, i.e. what any tool must wait for.
- disk: what the second machine adds under $PYMACHINE_HOME before provisioning.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BRIDGE, SUBNET = "pmbench0", "10.231.251.0/24"
CACHE = os.environ.get("PYMACHINE_TEST_CACHE", "/var/tmp/pymachine-test-cache")


def pymachine(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "machine", *args], env=env, check=True, capture_output=True)


def wait_banner(host: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, 22), timeout=0.2) as s:
                if s.recv(4) == b"SSH-":
                    return
        except OSError:
            time.sleep(0.005)
    raise TimeoutError(host)


def floor_boot(machine_dir: Path, record: dict) -> float:
    """Boot the stopped machine's own layers with a bare nspawn command line; seconds to the SSH banner."""
    layer = machine_dir / "layer"
    script = (
        f"ip neigh flush to {record['resources']['ip']} dev {BRIDGE} && "  # forget the killed machine's MAC
        f"mount -t overlay overlay -o lowerdir={record['resources']['base']},upperdir={layer}/upper,"
        f"workdir={layer}/work {layer}/root && exec systemd-nspawn --boot --register=no --keep-unit --quiet "
        f"--machine=floor-{record['id']} --directory={layer}/root --network-bridge={BRIDGE} --resolv-conf=off "
        f"--link-journal=no --console=passive --capability=all '--system-call-filter=@keyring bpf'"
    )
    start = time.monotonic()
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_banner(record["resources"]["ip"], start + 60)
        return time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(30)


def disk_usage(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "PYMACHINE_HOME": home, "PYMACHINE_CACHE": CACHE,
               "PYMACHINE_LOCAL_BRIDGE": BRIDGE, "PYMACHINE_LOCAL_SUBNET": SUBNET}
        pymachine(env, "create", "--no-provision", "first")  # builds or reuses the base; not measured
        creates, floors, disks = [], [], []
        try:
            for i in range(rounds):
                name = f"second{i}"
                start = time.monotonic()
                pymachine(env, "create", "--no-provision", name)
                creates.append(time.monotonic() - start)
                machine_dir = Path(home, "machines", name)
                disks.append(disk_usage(machine_dir))
                pymachine(env, "kill", name)
                floors.append(floor_boot(machine_dir, json.loads((machine_dir / "config.json").read_text())))
                pymachine(env, "rm", "-y", name)
        finally:
            names = subprocess.run([sys.executable, "-m", "machine", "ls", "-q"], env=env, capture_output=True,
                                   text=True).stdout.split()
            if names:
                pymachine(env, "rm", "-f", *names)
    create, floor = statistics.median(creates), statistics.median(floors)
    print(f"| metric (median of {rounds}) | value |\n|---|---|")
    print(f"| `create --no-provision`, second machine, until a pinned SSH session | {create:.2f} s |")
    print(f"| floor: bare `systemd-nspawn --boot` over the overlay until the SSH banner | {floor:.2f} s |")
    print(f"| pymachine's own overhead (create - floor) | {create - floor:.2f} s |")
    print(f"| ratio create / floor | {create / floor:.2f}x |")
    print(f"| disk of the second machine before provisioning | {statistics.median(disks) / 2**20:.2f} MiB |")


if __name__ == "__main__":
    main()
