"""`pymachine apply` of an unchanged fleet against one machine's no-op; pymachine against pyinfra and ansible-playbook.

Run as root: `.venv/bin/python bench/apply.py [--machines 8] [--rounds 3] [--mitogen DIR] [--pyinfra VENV]`
(ansible-core in the venv; DIR: where `pip install --target DIR mitogen` put Mitogen; VENV: a virtualenv with
pyinfra, kept apart from pymachine's). Prints a Markdown table and writes it to bench/results/apply.md.

Setup (not measured): N local machines (`--engine-install distro`) made by `pymachine apply` of a fleet file
(fleet `bench`), and a second fleet file of the same fleet naming only the first machine. Then, median of the
rounds, every run a whole command as a user types it; the no-op runs of pymachine and the floors run in turn
within each round (bench/timing.py's interleaved_medians), so that the host's drift during the run does not
skew the ratios between them:
- `pymachine provision cmp1`: one machine's no-op (the roles, nothing to change);
- `pymachine apply one.yaml`: the same machine as a fleet of one (plan: a check-mode run; nothing to do);
- `pymachine apply fleet.yaml`: all N machines, unchanged ("N machines unchanged" asserted);
- floor: bench/provision.py's hand-written script of the roles' checks, run by `ssh` on the first machine and
  on all N at once: what the machines' own work costs with no tool around it, and how it grows on these CPUs;
  once with a login per run and once over connections kept between runs (ControlPersist), as pymachine's are;
- `ansible-playbook -f N`: the same roles and variables on the same N machines (bench/ansible_compare.py's
  setup: pipelining, ControlPersist masters up before the clock runs, facts limited to what the roles read);
- with --mitogen: the same with Mitogen's `mitogen_linear` strategy;
- with --pyinfra (or pyinfra on PATH): `pyinfra -y --parallel N` of a deploy checking what the roles manage,
  on the first machine alone and on all N: the seven files they write (content, mode, owner; copies taken from
  each machine before the clock runs), the engine packages, the engine's and containerd's services (running,
  enabled) and ip_forward, and restarting the engine when a file was written. It checks less than the roles do
  (no module probes, no engine bridge check), so it is a lower bound for pyinfra.
- converge, on the first machine and on all N: the seven files deleted before each round (not timed), then
  `pymachine provision` of the machines (at once), the pyinfra deploy, and ansible-playbook write them again and
  restart the engine (each asserted to change something).

The machines go on PYMACHINE_BENCH_BRIDGE / PYMACHINE_BENCH_SUBNET (defaults below).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ansible_compare import MANAGED, Bench  # bench/, the script's own directory
from provision import FLOOR
from timing import interleaved_medians, median_seconds

BRIDGE = os.environ.get("PYMACHINE_BENCH_BRIDGE", "pmbench2")
SUBNET = os.environ.get("PYMACHINE_BENCH_SUBNET", "10.231.72.0/24")
CACHE = os.environ.get("PYMACHINE_TEST_CACHE", "/var/tmp/pymachine-test-cache")
HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "machine"]


def fleet_file(path: Path, names: list[str]) -> Path:
    entries = "".join(f"  {name}: {{}}\n" for name in names)
    path.write_text(f"name: bench\ndefaults:\n  engine_install: distro\nmachines:\n{entries}")
    return path


PYINFRA_DEPLOY = """\
from pyinfra import host
from pyinfra.operations import apt, files, server, systemd
from pyinfra.operations.util import any_changed

written = [files.put(name=f"file {path}", src=f"{host.data.copies}{path}", dest=path, mode=mode, user=user,
                     group=group) for path, mode, user, group in host.data.managed]
apt.packages(name="engine packages", packages=["docker.io", "containerd", "runc"])
for unit in ("docker", "containerd"):
    systemd.service(name=f"service {unit}", service=unit, running=True, enabled=True)
server.sysctl(name="ip_forward", key="net.ipv4.ip_forward", value=1)
# As the engine role's handler: the engine restarts (units read again) only when its configuration was written.
systemd.service(name="restart docker", service="docker", restarted=True, daemon_reload=True,
                _if=any_changed(*written))
"""


def pyinfra_setup(names: list[str], work: Path) -> tuple[Path, Path, list[str]]:
    """(inventory, deploy, the machines' addresses) for pyinfra: pymachine's address, key and pinned host key;
    each machine's copies of the files the roles wrote, with their modes and owners."""
    from machine import commands
    from machine.store import Store

    hosts = []
    for name in names:
        machine, driver = commands.load(Store(), name)
        copies = work / "copies" / name
        managed = []
        for path in MANAGED.split():
            (copies / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([*CLI, "ssh", name, "--", f"stat -c '%a %U %G' {path} && cat {path}"],
                                  capture_output=True, text=True, check=True)
            head, _, body = proc.stdout.partition("\n")
            (copies / path.lstrip("/")).write_text(body)
            managed.append((path, *head.split()))
        hosts.append((driver.ip(), {"ssh_user": "root", "ssh_key": str(machine.key_path),
                                    "ssh_known_hosts_file": str(machine.known_hosts_path),
                                    "ssh_strict_host_key_checking": "yes", "copies": str(copies),
                                    "managed": managed}))
    inventory, deploy = work / "pyinfra_inventory.py", work / "pyinfra_deploy.py"
    inventory.write_text(f"machines = {hosts!r}\n")
    deploy.write_text(PYINFRA_DEPLOY)
    return inventory, deploy, [address for address, _ in hosts]


def run_pyinfra(pyinfra: Path, inventory: Path, deploy: Path, hosts: list[str], converge: bool = False) -> None:
    """One pyinfra run on `hosts` (all at once), which must succeed and change nothing (its results table's
    grand total), or with `converge` change something."""
    limits = [arg for host in hosts for arg in ("--limit", host)]
    proc = subprocess.run([str(pyinfra), "-y", "--parallel", str(len(hosts)), *limits, str(inventory), str(deploy)],
                          capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    total = next((line.split()[2:] for line in output.splitlines() if line.strip().startswith("Grand total")), None)
    reached = set(re.findall(r"^\s+\[([^\]]+)\] ", output, re.M))  # hosts named in the operations' lines
    # (host operations), changed ("Success"), errors, unchanged: a no-op on every host has neither changes nor errors
    if (proc.returncode != 0 or total is None or total[2] != "-" or (total[1] == "-") == converge
            or reached != set(hosts)):
        raise SystemExit(f"pyinfra failed or changed something:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")


def floor_logins(names: list[str], masters: Path | None = None) -> list[list[str]]:
    """For each machine, an OpenSSH command running FLOOR (bench/provision.py: the roles' checks as one hand-written
    script) with its key and pinned host key, and paramiko's key exchange (OpenSSH's default costs both sides more);
    with `masters`, over a connection kept there (ControlPersist, as pymachine's own are kept)."""
    from machine import commands
    from machine.store import Store

    logins = []
    for name in names:
        machine, driver = commands.load(Store(), name)
        kept = ["-o", "ControlMaster=auto", "-o", f"ControlPath={masters / name}", "-o", "ControlPersist=900"] \
            if masters else []
        logins.append(["ssh", "-q", "-i", str(machine.key_path), "-o", f"UserKnownHostsFile={machine.known_hosts_path}",
                       "-o", "StrictHostKeyChecking=yes", "-o", "KexAlgorithms=curve25519-sha256", *kept,
                       f"root@{driver.ip()}", FLOOR])
    return logins


def floor(logins: list[list[str]]) -> None:
    """The floor on every machine at once: nothing but the checks and a login each."""
    procs = [subprocess.Popen(login, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for login in logins]
    if any(proc.wait() != 0 for proc in procs):
        raise SystemExit("the floor script failed")


def run(*args: str, expect: str | None = None) -> str:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if proc.returncode != 0 or (expect and expect not in proc.stdout):
        raise SystemExit(f"pymachine {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def converge(names: list[str]) -> None:
    """`pymachine provision` of `names` (at once), which must change something on every one of them."""
    changed = dict(re.findall(r"^(\S+) : ok=\d+ changed=(\d+)", run("provision", *names), re.M))
    if sorted(changed) != sorted(names) or "0" in changed.values():
        raise SystemExit(f"pymachine provision changed nothing on some of {names}: {changed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mitogen", type=Path, help="directory holding ansible_mitogen (pip install --target)")
    parser.add_argument("--pyinfra", type=Path, help="virtualenv with pyinfra installed (default: pyinfra on PATH)")
    parser.add_argument("--ansible-rounds", type=int, default=3, help="rounds of the (slow) ansible-playbook runs")
    args = parser.parse_args()
    on_path = shutil.which("pyinfra")
    pyinfra = args.pyinfra / "bin" / "pyinfra" if args.pyinfra else Path(on_path) if on_path else None
    names = [f"cmp{i}" for i in range(1, args.machines + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.update(PYMACHINE_HOME=f"{tmp}/home", PYMACHINE_CACHE=CACHE, PYMACHINE_LOCAL_BRIDGE=BRIDGE,
                          PYMACHINE_LOCAL_SUBNET=SUBNET, DOCKER_CONFIG=f"{tmp}/docker")
        try:
            fleet, one = fleet_file(work / "fleet.yaml", names), fleet_file(work / "one.yaml", names[:1])
            run("apply", str(fleet))  # all N made at once, by the parallel runner
            run("apply", str(fleet), expect=f"{len(names)} machines unchanged")  # warm: page cache, pyc files
            results: dict[str, float] = {}

            def keep(what: str, seconds: float) -> None:
                results[what] = seconds
                print(f"{what}: {seconds:.2f}s", file=sys.stderr)  # kept if a later, slower one is cut short

            def measure(what: str, fn: Callable[[], object], rounds: int,
                        before: Callable[[], object] | None = None) -> None:
                keep(what, median_seconds(fn, rounds, before))

            n = len(names)
            logins = floor_logins(names)
            masters = Path(f"/tmp/pmb-cp-{os.getpid()}")  # Bench's ControlPersist sockets (removed at the end)
            masters.mkdir(mode=0o700, exist_ok=True)
            kept = floor_logins(names, masters)
            floor(kept)  # the masters up before the clock runs, as pymachine's are after its warm-up run
            # The runs the ratios compare, in turn within each round.
            for what, seconds in interleaved_medians({
                "`pymachine provision` (1 machine, no-op)": lambda: run("provision", names[0]),
                "`pymachine apply` (fleet of 1, unchanged)": lambda: run("apply", str(one),
                                                                         expect="1 machine unchanged"),
                f"`pymachine apply` (fleet of {n}, unchanged)": lambda: run("apply", str(fleet),
                                                                            expect=f"{n} machines unchanged"),
                "floor: the roles' checks as one shell script over `ssh` (1 machine)": lambda: floor(logins[:1]),
                f"floor: the same on {n} machines at once": lambda: floor(logins),
                "floor over kept connections (1 machine)": lambda: floor(kept[:1]),
                f"floor over kept connections, {n} machines at once": lambda: floor(kept),
            }, args.rounds).items():
                keep(what, seconds)
            bench = Bench(names, work)  # ansible_compare's: Ansible's inventory, and reset() for the converge runs
            if pyinfra:
                inventory, deploy, addresses = pyinfra_setup(names, work)
                run_pyinfra(pyinfra, inventory, deploy, addresses)  # warm, and must be a no-op
                measure("`pyinfra` (1 machine, no-op; checks less)",
                        lambda: run_pyinfra(pyinfra, inventory, deploy, addresses[:1]), args.rounds)
                measure(f"`pyinfra --parallel {n}` ({n} machines, no-op; checks less)",
                        lambda: run_pyinfra(pyinfra, inventory, deploy, addresses), args.rounds)
            # Converge: the files the roles write are deleted on the machines before each round (not timed); the
            # run writes them again and restarts the engine.
            for size in (1, n):
                subset = names[:size]
                measure(f"`pymachine provision` ({size} machine{'s' * (size > 1)}, converge)",
                        lambda s=subset: converge(s), args.rounds, lambda s=subset: bench.reset(s))
                if pyinfra:
                    measure(f"`pyinfra --parallel {size}` ({size} machine{'s' * (size > 1)}, converge)",
                            lambda a=addresses[:size]: run_pyinfra(pyinfra, inventory, deploy, a, converge=True),
                            args.rounds, lambda s=subset: bench.reset(s))
            ansible_runs: list[tuple[str, dict[str, str]]] = [("", {})]
            if args.mitogen:
                plugins = args.mitogen / "ansible_mitogen" / "plugins" / "strategy"
                ansible_runs.append((", Mitogen", {"ANSIBLE_STRATEGY": "mitogen_linear", "ANSIBLE_STRATEGY_PLUGINS":
                                                   str(plugins), "PYTHONPATH": str(args.mitogen)}))
            plain_env = dict(bench.env)

            def ansible(subset: list[str], converging: bool) -> None:
                if (bench.ansible(subset)[1] > 0) != converging:
                    raise SystemExit(f"ansible-playbook {'changed nothing' if converging else 'changed something'}")

            for label, extra in ansible_runs:
                bench.env = plain_env | extra
                ansible(names, False)  # warm: SSH masters up; it must find what pymachine provisioned
                for size in (1, n):
                    subset, machines = names[:size], f"{size} machine{'s' * (size > 1)}"
                    measure(f"`ansible-playbook -f {size}`{label} ({machines}, no-op)",
                            lambda s=subset: ansible(s, False), args.ansible_rounds)
                    measure(f"`ansible-playbook -f {size}`{label} ({machines}, converge)",
                            lambda s=subset: ansible(s, True), args.ansible_rounds, lambda s=subset: bench.reset(s))
            bench.pool.shutdown()
        finally:
            subprocess.run([*CLI, "rm", "-f", *names], check=False, capture_output=True)
            masters = Path(f"/tmp/pmb-cp-{os.getpid()}")
            for sock in masters.glob("*") if masters.is_dir() else []:
                subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True)
    base = next(iter(results.values()))
    lines = ["| run | seconds | vs one machine's no-op |", "|---|---|---|"]
    lines += [f"| {what} | {seconds:.2f} | {seconds / base:.1f} |" for what, seconds in results.items()]
    text = (f"Medians of {args.rounds} rounds ({args.ansible_rounds} for ansible-playbook), whole commands, "
            f"{os.cpu_count()} CPUs (shared with other work while measured: absolute times are inflated).\n\n"
            + "\n".join(lines) + "\n")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "apply.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
