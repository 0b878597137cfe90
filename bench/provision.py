"""Provisioning speed on one local machine: no-op re-run and converge, against the physical floor.

Run as root: `.venv/bin/python bench/provision.py [--rounds N]`. Prints a Markdown table. The machine goes on
PYMACHINE_BENCH_BRIDGE / PYMACHINE_BENCH_SUBNET (defaults below).

- no-op: the full role set on a machine that is already provisioned (nothing to change), measured
  in-process (one SSH connection, as `pymachine provision` does) and as the whole CLI command.
- floor: the same checks written by hand as ONE shell script sent over one SSH connection (file checksums and
  modes, services, packages, sysctls, modules, NAT rules, the engine's bridge) — what any tool must at least do.
- converge: the configuration roles with the engine packages already installed: pymachine's files are deleted
  from the machine (daemon.json, drop-in, TLS files, modules-load and sysctl files), then provisioning
  writes them again and restarts the engine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from timing import median_seconds  # bench/, the script's own directory

from machine import commands
from machine.commands.engine import run_provisioning
from machine.store import Store

BRIDGE = os.environ.get("PYMACHINE_BENCH_BRIDGE", "pmbench0")
SUBNET = os.environ.get("PYMACHINE_BENCH_SUBNET", "10.231.251.0/24")
CACHE = os.environ.get("PYMACHINE_TEST_CACHE", "/var/tmp/pymachine-test-cache")
MANAGED = ("/etc/modules-load.d/pymachine.conf /etc/sysctl.d/90-pymachine.conf /etc/docker/daemon.json "
           "/etc/systemd/system/docker.service.d/pymachine.conf /etc/docker/tls/ca.pem "
           "/etc/docker/tls/server-cert.pem /etc/docker/tls/server-key.pem")
FLOOR = f"""
sha256sum {MANAGED}
stat -c '%a %U %G %n' {MANAGED} /etc/docker /etc/docker/tls /etc/systemd/system/docker.service.d
for m in overlay br_netfilter; do [ -d /sys/module/$m ] || grep -q "^$m " /proc/modules; done
cat /proc/sys/net/ipv4/ip_forward
dpkg-query -W -f='${{Package}} ${{Status}}\\n' docker.io containerd runc
systemctl is-active docker containerd; systemctl is-enabled docker containerd
command -v dockerd
findmnt -n -o FSTYPE --target /var/lib/docker
iptables -t nat -S POSTROUTING
ip -4 -o route show dev docker0 proto kernel scope link
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as home:
        os.environ.update(PYMACHINE_HOME=home, PYMACHINE_CACHE=CACHE, PYMACHINE_LOCAL_BRIDGE=BRIDGE,
                          PYMACHINE_LOCAL_SUBNET=SUBNET)
        store = Store()
        cli = [sys.executable, "-m", "machine"]
        subprocess.run([*cli, "create", "--engine-install", "distro", "bench"], check=True)
        try:
            machine, driver = commands.load(store, "bench")

            def noop() -> None:
                recap = run_provisioning(store, machine, driver)
                assert recap.changed == 0, recap.line

            def floor() -> None:
                with commands.connect(machine, driver) as conn:
                    conn.run(FLOOR, check=True)

            def cli_noop() -> None:
                subprocess.run([*cli, "provision", "bench"], check=True, capture_output=True)

            def converge() -> None:
                with commands.connect(machine, driver) as conn:
                    conn.run(f"rm -f {MANAGED}", check=True)
                start = time.perf_counter()
                recap = run_provisioning(store, machine, driver)
                converge_times.append(time.perf_counter() - start)
                assert recap.changed > 0, recap.line

            noop()  # warm caches on both sides before measuring
            noop_s, floor_s, cli_s = (median_seconds(f, rounds) for f in (noop, floor, cli_noop))
            converge_times: list[float] = []
            for _ in range(rounds):
                converge()
            converge_s = statistics.median(converge_times)
        finally:
            subprocess.run([*cli, "rm", "-f", "bench"], check=False)
    print(f"| provisioning, one local machine (median of {rounds}) | seconds |\n|---|---|")
    print(f"| no-op re-provision of the full role set (one SSH connection) | {noop_s:.2f} |")
    print(f"| floor: the same checks as one hand-made shell script over one SSH connection | {floor_s:.2f} |")
    print(f"| ratio no-op / floor | {noop_s / floor_s:.1f}x |")
    print(f"| `pymachine provision` command, no-op, wall time | {cli_s:.2f} |")
    print(f"| converge of the configuration roles, engine packages installed | {converge_s:.2f} |")


if __name__ == "__main__":
    main()
