"""Adopting a server with the generic driver: adopt + full provision of a host that already has the engine.

Run as root: `.venv/bin/python bench/generic_adopt.py [--rounds N]`. Prints a Markdown table of medians.

A local machine with Docker (distro packages) stands in for the server; it gets a user `deploy` with
passwordless sudo and an RSA key. Each round adopts it (a new machine, so a new server certificate:
the engine restarts to load them), then `rm` forgets it (untimed). One home for every round: its CA is made once.
Measured:
- adopt only: `create --no-provision` (key copy, host key pinned, sudo checked), in-process;
- adopt + provision: the whole `create` in-process, as deploy (become through sudo) and as root, until a
  mutual-TLS handshake with the engine shows the server certificate this adopt issued;
- CLI: the same as deploy, as the `pymachine create` command (interpreter start included);
- provision again: a no-op `provision` on the adopted host, in-process.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import median_seconds  # bench/, the script's own directory

from machine import commands
from machine.store import Store

BRIDGE = os.environ.get("PYMACHINE_TEST_BRIDGE", "pmtd0")
SUBNET = os.environ.get("PYMACHINE_TEST_SUBNET", "10.231.244.0/24")
CACHE = os.environ.get("PYMACHINE_TEST_CACHE", "/var/tmp/pymachine-test-cache")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    os.environ.update(PYMACHINE_LOCAL_BRIDGE=BRIDGE, PYMACHINE_LOCAL_SUBNET=SUBNET, PYMACHINE_CACHE=CACHE)
    from machine.provision import engine_config

    engine = engine_config(install="distro")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        owner = Store(tmp_path / "owner")
        print("making the server (a local machine with Docker)...", file=sys.stderr)
        commands.create(owner, "srv", engine=engine)
        try:
            machine = owner.load("srv")
            address = machine.resources["ip"]
            key = tmp_path / "deploy"
            subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-N", "", "-f", str(key)], check=True)
            _, driver = commands.load(owner, "srv")
            with commands.connect(machine, driver) as conn:
                conn.run("useradd -m -s /bin/sh deploy && install -d -m 700 -o deploy -g deploy /home/deploy/.ssh && "
                         "echo 'deploy ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/deploy && "
                         "cat > /home/deploy/.ssh/authorized_keys && chown deploy: /home/deploy/.ssh/authorized_keys",
                         stdin=(tmp_path / "deploy.pub").read_bytes(), check=True)
            store = Store(tmp_path / "adopter")

            def adopt(user: str, key_file: Path, provision: bool = True) -> float:
                """One adopt, timed up to a TLS handshake with the engine showing its new certificate; `rm` (which
                only forgets the host) afterwards, untimed."""
                start = time.perf_counter()
                adopted = commands.create(store, "adopted", "generic", {
                    "generic_ip_address": address, "generic_ssh_user": user, "generic_ssh_key": str(key_file),
                }, engine=engine, provision=provision)
                if provision:
                    check_engine(adopted.dir, address)
                seconds = time.perf_counter() - start
                commands.rm(store, "adopted")
                return seconds

            adopt("deploy", key)  # warm: makes the home's CA, converges what differs from the owner's provisioning
            rows = [
                ("adopt only (`--no-provision`), as deploy",
                 statistics.median(adopt("deploy", key, False) for _ in range(rounds))),
                ("adopt + full provision, as deploy (sudo)",
                 statistics.median(adopt("deploy", key) for _ in range(rounds))),
                ("adopt + full provision, as root", statistics.median(adopt("root", machine.key_path)
                                                                      for _ in range(rounds))),
            ]
            env = {**os.environ, "PYMACHINE_HOME": str(store.home)}
            pymachine = [sys.executable, "-m", "machine"]

            cli_times = []
            for _ in range(rounds):
                start = time.perf_counter()
                subprocess.run([*pymachine, "create", "--driver", "generic", "--generic-ip-address", address,
                                "--generic-ssh-user", "deploy", "--generic-ssh-key", str(key), "--engine-install",
                                "distro", "adopted"], env=env, check=True, capture_output=True)
                cli_times.append(time.perf_counter() - start)
                subprocess.run([*pymachine, "rm", "-y", "adopted"], env=env, check=True, capture_output=True)
            rows.append(("`pymachine create --driver generic …` (CLI), as deploy", statistics.median(cli_times)))
            commands.create(store, "adopted", "generic", {
                "generic_ip_address": address, "generic_ssh_user": "deploy", "generic_ssh_key": str(key)},
                engine=engine)
            no_op = median_seconds(lambda: commands.provision(store, "adopted"), rounds)
            rows.append(("provision again (no-op), as deploy", no_op))
            commands.rm(store, "adopted")
        finally:
            commands.rm(owner, "srv", force=True)
    print(f"| generic driver, medians of {rounds} rounds | seconds |\n|---|---|")
    for what, seconds in rows:
        print(f"| {what} | {seconds:.2f} |")


def check_engine(machine_dir: Path, address: str) -> None:
    """One mutual-TLS handshake with the engine, as the docker CLI makes it; it must show the server certificate
    this adopt issued (an engine not restarted would show the previous one)."""
    context = ssl.create_default_context(cafile=machine_dir / "ca.pem")
    context.load_cert_chain(machine_dir / "cert.pem", machine_dir / "key.pem")
    with socket.create_connection((address, 2376), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=address) as tls:
        shown = tls.getpeercert(binary_form=True)
    issued = ssl.PEM_cert_to_DER_cert((machine_dir / "server.pem").read_text())
    if shown != issued:
        raise SystemExit("the engine does not show the certificate this adopt issued")


if __name__ == "__main__":
    main()
