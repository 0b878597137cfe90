"""Create-to-SSH of a libvirt machine (image cached) against the floor: the same image booted by bare QEMU.

Run as root with libvirtd running: `.venv/bin/python bench/libvirt_boot.py [--rounds N]`. Builds (or reuses)
the integration tests' Debian 12 cloud image. Prints a Markdown table.

- pymachine: wall time of `pymachine create --driver libvirt --libvirt-domain-type qemu --no-provision NAME`
  until it returns with a pinned, authenticated SSH session (base image already in the cache and the pool).
- floor: `qemu-system-x86_64` with TCG, the same CPU/memory, a fresh overlay of the same base, the same seed
  and the same forwarded SSH port, until sshd's banner answers: what any tool must wait for.
- pymachine's own time: the create's wall time minus its own guest's boot (from libvirt starting QEMU, per
  the domain's log, to the first SSH banner, watched alongside pymachine). It does not depend on how fast the
  host emulates that boot, so it stays meaningful on a loaded host, where the paired comparison with the floor
  is noisy (each TCG boot varies by tens of seconds there).
- disk: what the machine adds before provisioning (its overlay, seed and machine directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration import cloudimage

URI = "qemu:///system"
MEMORY, CPUS, DISK_GIB = 1024, 1, 4


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], check=True, capture_output=True, text=True).stdout


def pymachine(env: dict[str, str], *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "machine", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"pymachine {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")


def banner(port: int) -> bool:
    """Whether sshd greets on the forwarded port (QEMU accepts, then drops, while the guest does not listen)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            return s.recv(4) == b"SSH-"
    except OSError:
        return False


def wait_banner(port: int, deadline: float) -> None:
    while not banner(port):
        if time.monotonic() > deadline:
            raise TimeoutError(port)
        time.sleep(0.2)


class BannerWatch(threading.Thread):
    """Notes (wall clock) when a machine's SSH port first greets, while pymachine creates the machine."""

    def __init__(self, config: Path) -> None:
        super().__init__(daemon=True)
        self.config = config
        self.seen: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        port = None
        while not self.done.is_set():
            if port is None:
                with contextlib.suppress(OSError, ValueError, KeyError):
                    port = json.loads(self.config.read_text())["resources"]["ssh_port"]
            elif banner(port):
                self.seen = time.time()
                return
            time.sleep(0.1)


def qemu_started(name: str) -> float:
    """When libvirt started the domain's QEMU (wall clock), from the domain's log."""
    lines = Path(f"/var/log/libvirt/qemu/{name}.log").read_text().splitlines()
    stamp = [line for line in lines if ": starting up " in line][-1].split(": starting up ")[0]
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f%z").timestamp()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def floor_boot(base: Path, seed: Path, mac: str, work: Path) -> float:
    """Seconds from exec to the SSH banner of bare QEMU booting a fresh overlay with the machine's seed."""
    overlay = work / "floor.qcow2"
    overlay.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay),
                    f"{DISK_GIB}G"], check=True)
    port = free_port()
    cmd = [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", str(MEMORY), "-smp", str(CPUS),
        "-nodefaults", "-display", "none", "-serial", "null",
        "-drive", f"file={overlay},if=virtio,format=qcow2,discard=unmap",
        "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", f"virtio-net-pci,netdev=n0,mac={mac}",
        "-object", "rng-random,id=rng0,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng0",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_banner(port, start + 600)
        return time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(30)
        overlay.unlink(missing_ok=True)


def allocation(pool: str, volume: str) -> int:
    info = virsh("vol-info", "--bytes", "--pool", pool, volume)
    return int(next(line.split()[1] for line in info.splitlines() if line.startswith("Allocation:")))


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    image = cloudimage.build()
    pool = f"pmbench-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        (work / "pool").mkdir()
        for path in (work, work / "pool"):
            path.chmod(0o755)  # QEMU runs as libvirt-qemu
        virsh("pool-create-as", pool, "dir", "--target", str(work / "pool"))
        env = {**os.environ, "PYMACHINE_HOME": str(work / "home"), "PYMACHINE_CACHE": str(work / "cache"),
               "PYMACHINE_LIBVIRT_POOL": pool, "PYMACHINE_LIBVIRT_NETWORK": "user",
               "PYMACHINE_LIBVIRT_DOMAIN_TYPE": "qemu", "PYMACHINE_LIBVIRT_IMAGE": str(image),
               # With its checksum the image is copied into the cache once, as a download would be.
               "PYMACHINE_LIBVIRT_IMAGE_SHA256": cloudimage.sha256(image),
               "PYMACHINE_LIBVIRT_MEMORY": str(MEMORY), "PYMACHINE_LIBVIRT_CPUS": str(CPUS),
               "PYMACHINE_LIBVIRT_DISK_SIZE": str(DISK_GIB)}
        creates, boots, floors, disks = [], [], [], []
        try:
            pymachine(env, "create", "--driver", "libvirt", "--no-provision", "first")  # fills cache and pool
            pymachine(env, "rm", "-y", "first")
            for i in range(rounds):
                name = f"second{i}"
                watch = BannerWatch(work / "home/machines" / name / "config.json")
                watch.start()
                start = time.time()
                pymachine(env, "create", "--driver", "libvirt", "--no-provision", name)
                creates.append(time.time() - start)
                watch.join(timeout=30)  # it polls as often as pymachine does, but may be a poll behind
                watch.done.set()
                if watch.seen is None:
                    raise SystemExit(f"never saw the SSH banner of {name}")
                boots.append(watch.seen - qemu_started(name))
                record = json.loads((work / "home/machines" / name / "config.json").read_text())
                r = record["resources"]
                disks.append(allocation(pool, r["disk"]) + allocation(pool, r["seed"])
                             + du(work / "home/machines" / name))
                seed = work / "seed.iso"
                shutil.copyfile(work / "pool" / r["seed"], seed)
                base = next((work / "pool").glob("pymachine-base-*"))
                pymachine(env, "rm", "-y", name)
                floors.append(floor_boot(base, seed, r["mac"], work))
        finally:
            subprocess.run([sys.executable, "-m", "machine", "rm", "-f", "-y", "first",
                            *(f"second{i}" for i in range(rounds))], env=env, capture_output=True)
            for vol in virsh("vol-list", pool).splitlines():
                if vol.split():
                    virsh("vol-delete", "--pool", pool, vol.split()[0])
            virsh("pool-destroy", pool)

    create, floor = statistics.median(creates), statistics.median(floors)
    mib = 1 << 20
    print("| measure | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " | median |")
    print("|---|" + "---|" * (rounds + 1))
    print("| pymachine create → SSH ready (s) | " + " | ".join(f"{x:.1f}" for x in creates) + f" | {create:.1f} |")
    print("| bare qemu-system-x86_64 → SSH banner (s) | " + " | ".join(f"{x:.1f}" for x in floors)
          + f" | {floor:.1f} |")
    print("| pymachine overhead | " + " | ".join(f"{(c - f) / f:+.1%}" for c, f in zip(creates, floors, strict=True))
          + f" | {(create - floor) / floor:+.1%} |")
    own = [c - b for c, b in zip(creates, boots, strict=True)]
    print("| its guest's boot, QEMU start → SSH banner (s) | " + " | ".join(f"{x:.1f}" for x in boots)
          + f" | {statistics.median(boots):.1f} |")
    print("| pymachine's own time: create - its guest's boot (s) | " + " | ".join(f"{x:.1f}" for x in own)
          + f" | {statistics.median(own):.1f} |")
    print("| pymachine's own time / its guest's boot | " + " | ".join(
        f"{o / b:.1%}" for o, b in zip(own, boots, strict=True))
        + f" | {statistics.median(o / b for o, b in zip(own, boots, strict=True)):.1%} |")
    print("| machine disk before provisioning (MiB) | " + " | ".join(f"{x / mib:.1f}" for x in disks)
          + f" | {statistics.median(disks) / mib:.1f} |")


if __name__ == "__main__":
    main()
