"""pymachine's native role executor against ansible-playbook: same machines, same roles, same variables.

Run as root: `.venv/bin/python bench/ansible_compare.py [--rounds 3] [--sizes 1,2,4,8]` (ansible-core in the
venv). Writes bench/results/ansible_compare.md (also printed) and bench/results/ansible_compare.png.

Setup: 8 fresh local machines (bridge pmbench1, 10.231.71.0/24), created and provisioned concurrently by
pymachine with `--engine-install distro`, so the engine packages are installed. Both tools then run the five
roles (kernel, storage, tls, engine, bridge) with identical variables: Ansible gets, as host variables, exactly
the role variables pymachine passes (its CA, each machine's server certificate and key). Before the clock
runs, both tools re-run once on all 8 machines provisioned by `pymachine create`, and must change nothing: the
two tools converge to the same state (asserted), and Ansible's SSH master connections are up.

Measured, for N = 1, 2, 4, 8 machines at once, in rounds that alternate which tool goes first (median of the
rounds):
- converge: the configuration roles with the engine packages present. Before each converge pymachine's
  configuration files are deleted on the N machines (daemon.json, the docker.service drop-in, the TLS files,
  the modules-load and sysctl files; not timed); the tool writes them again and restarts the engine.
- no-op: the same run again, nothing to change (changed=0 asserted).

pymachine: `commands.provision(store, name)` (what `pymachine provision NAME` runs: one new SSH connection per
machine per run), the N machines at once in a pool of N worker processes started (and warmed) beforehand.
Ansible, in its best configuration: ssh connection with pipelining, ControlPersist (master connections stay up
between runs), forks = N, python interpreter given (no discovery), facts gathered once per run with only the
subsets the roles use (min, virtual).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from machine import certs, commands
from machine import provision as plan
from machine.certs import server_pair
from machine.paths import roles_dir
from machine.store import Store

BRIDGE, SUBNET = "pmbench1", "10.231.71.0/24"
CACHE = os.environ.get("PYMACHINE_TEST_CACHE", "/var/tmp/pymachine-test-cache")
HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
MANAGED = ("/etc/modules-load.d/pymachine.conf /etc/sysctl.d/90-pymachine.conf /etc/docker/daemon.json "
           "/etc/systemd/system/docker.service.d/pymachine.conf /etc/docker/tls/ca.pem "
           "/etc/docker/tls/server-cert.pem /etc/docker/tls/server-key.pem")
PLAYBOOK = """\
- name: Provision
  hosts: machines
  gather_facts: true
  gather_subset: [min, virtual]   # distribution, os_family, architecture, virtualization: what the roles read
  roles: [kernel, storage, tls, engine, bridge]
"""
RECAP = re.compile(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def _provision(name: str) -> int:
    """One machine's provisioning in a pool worker; its changed count."""
    recap = commands.provision(Store(), name)
    return recap.changed


def _warm(_: int) -> None:
    from machine.roles import run_roles  # noqa: F401  (import the executor before the clock runs)


class Bench:
    def __init__(self, names: list[str], work: Path) -> None:
        self.names, self.work, self.store = names, work, Store()
        self.pool = ProcessPoolExecutor(len(names), mp_context=multiprocessing.get_context("fork"))
        list(self.pool.map(_warm, range(len(names) * 2)))
        self.inventory = work / "inventory.yml"
        self.playbook = work / "site.yml"
        self.playbook.write_text(PLAYBOOK)
        self.inventory.write_text(yaml.safe_dump(self._inventory()))
        self.env = {
            **os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "ANSIBLE_ROLES_PATH": str(roles_dir()),
            "ANSIBLE_PIPELINING": "true", "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=900s",
            "ANSIBLE_SSH_CONTROL_PATH_DIR": f"/tmp/pmb-cp-{os.getpid()}", "ANSIBLE_LOCAL_TEMP": str(work / "tmp"),
            "ANSIBLE_RETRY_FILES_ENABLED": "false", "ANSIBLE_NOCOLOR": "1",
        }

    def _inventory(self) -> dict:
        """pymachine's inventory (address, key, pinned host key) plus the role variables pymachine passes."""
        hosts = {}
        ca, _ = certs.ensure_ca(self.store.certs())
        for name in self.names:
            machine, _ = commands.load(self.store, name)
            server_cert, server_key = server_pair(machine.dir).pem()
            hosts[name] = {**commands.host_vars(self.store, name), "ansible_python_interpreter": "/usr/bin/python3",
                           **plan.role_vars(machine.engine, ca.cert.read_text(), server_cert, server_key)}
        return {"machines": {"hosts": hosts}}

    def reset(self, names: list[str]) -> None:
        """Delete the configuration files, so the next run converges them (engine packages stay)."""
        procs = [subprocess.Popen([sys.executable, "-m", "machine", "ssh", n, "--", f"rm -f {MANAGED}"])
                 for n in names]
        assert all(p.wait() == 0 for p in procs)

    def pymachine(self, names: list[str]) -> tuple[float, int]:
        start = time.perf_counter()
        changed = sum(self.pool.map(_provision, names))
        return time.perf_counter() - start, changed

    def ansible(self, names: list[str]) -> tuple[float, int]:
        argv = ["ansible-playbook", "-i", str(self.inventory), "-f", str(len(names)), "--limit", ",".join(names),
                str(self.playbook)]
        start = time.perf_counter()
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        recaps = RECAP.findall(proc.stdout)
        if proc.returncode != 0 or len(recaps) != len(names) or any(r[2] != "0" or r[3] != "0" for r in recaps):
            raise SystemExit(f"ansible-playbook failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
        return elapsed, sum(int(r[1]) for r in recaps)


def measure(bench: Bench, sizes: list[int], rounds: int) -> dict[tuple[str, str, int], float]:
    samples: dict[tuple[str, str, int], list[float]] = {}
    for n in sizes:
        names = bench.names[:n]
        for r in range(rounds):
            tools = [("pymachine", bench.pymachine), ("ansible", bench.ansible)]
            for tool, run in tools if r % 2 == 0 else tools[::-1]:  # alternate who goes first
                bench.reset(names)
                seconds, changed = run(names)
                assert changed > 0, f"{tool} converge changed nothing"
                samples.setdefault((tool, "converge", n), []).append(seconds)
                seconds, changed = run(names)
                assert changed == 0, f"{tool} no-op run changed {changed} tasks"
                samples.setdefault((tool, "no-op", n), []).append(seconds)
            print(f"N={n} round {r + 1}: " + ", ".join(f"{k[0]} {k[1]} {v[-1]:.2f}s" for k, v in samples.items()
                                                        if k[2] == n), file=sys.stderr)
    return {key: statistics.median(values) for key, values in samples.items()}


def table(result: dict[tuple[str, str, int], float], sizes: list[int], rounds: int) -> str:
    lines = ["| run | machines | pymachine (s) | ansible-playbook (s) | speed-up |",
             "|---|---|---|---|---|"]
    for phase in ("converge", "no-op"):
        for n in sizes:
            pm, an = result["pymachine", phase, n], result["ansible", phase, n]
            lines.append(f"| {phase} | {n} | {pm:.2f} | {an:.2f} | {an / pm:.1f}x |")
    return (f"Medians of {rounds} alternating rounds; 5 roles; engine packages installed; "
            f"{os.cpu_count()} CPUs.\n\n" + "\n".join(lines) + "\n")


def chart(result: dict[tuple[str, str, int], float], sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
    for ax, phase in zip(axes, ("converge", "no-op"), strict=True):
        for tool, style in (("pymachine", "o-"), ("ansible", "s--")):
            label = "ansible-playbook" if tool == "ansible" else tool
            ax.plot(sizes, [result[tool, phase, n] for n in sizes], style, label=label)
        ax.set(title=phase, xlabel="machines at once", ylabel="seconds", xticks=sizes, ylim=(0, None))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1,2,4,8")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    names = [f"cmp{i}" for i in range(1, max(sizes) + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(PYMACHINE_HOME=f"{tmp}/home", PYMACHINE_CACHE=CACHE, PYMACHINE_LOCAL_BRIDGE=BRIDGE,
                          PYMACHINE_LOCAL_SUBNET=SUBNET, DOCKER_CONFIG=f"{tmp}/docker")
        try:
            # Created and provisioned all at once (apt downloads overlap); this is setup, not measured.
            procs = [subprocess.Popen([sys.executable, "-m", "machine", "create", "--engine-install", "distro", n],
                                      stdout=subprocess.DEVNULL) for n in names]
            assert all(p.wait() == 0 for p in procs), "creating the machines failed"
            bench = Bench(names, Path(tmp))
            for tool, run in (("ansible", bench.ansible), ("pymachine", bench.pymachine)):
                assert run(names)[1] == 0, f"{tool} changed what `pymachine create` provisioned"
            result = measure(bench, sizes, args.rounds)
            bench.pool.shutdown()
        finally:
            subprocess.run([sys.executable, "-m", "machine", "rm", "-f", *names], check=False)
            ssh_masters = f"/tmp/pmb-cp-{os.getpid()}"
            for sock in Path(ssh_masters).glob("*") if Path(ssh_masters).is_dir() else []:
                subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True)
    text = table(result, sizes, args.rounds)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "ansible_compare.md").write_text(text)
    chart(result, sizes, out / "ansible_compare.png")
    print(text)
    print(f"wrote {out / 'ansible_compare.md'} and {out / 'ansible_compare.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
