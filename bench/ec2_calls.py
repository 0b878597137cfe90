"""EC2 API calls of the EC2 driver's commands, counted by a moto server on 127.0.0.1 from its request log.

Run: `.venv/bin/python bench/ec2_calls.py [--machines 10]`. Each command runs as the user runs it (a new
`pymachine` process); nothing is sent anywhere but the local moto server. Prints a Markdown table and writes it to
bench/results/ec2_calls.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.ec2_moto import MotoServer, moto_server, sealed_env  # noqa: E402

CIDR = ("--ec2-allowed-cidr", "203.0.113.7/32")


def pymachine(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "machine", *args], env=env, check=True, capture_output=True, text=True)


def counted(server: MotoServer, env: dict[str, str], *args: str) -> Counter[str]:
    server.recording.write_text("")
    pymachine(env, *args)
    return server.actions()


def row(what: str, calls: Counter[str]) -> str:
    detail = ", ".join(f"{action} {n}" if n > 1 else action for action, n in sorted(calls.items()))
    return f"| {what} | {sum(calls.values())} | {detail} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, moto_server(Path(tmp)) as server:
        env = sealed_env(server, Path(tmp) / "home")
        pymachine(env, "create", "--driver", "ec2", "--no-connect", *CIDR, "warmup")  # moto builds its backends
        pymachine(env, "rm", "-y", "warmup")
        rows = [row("`create --driver ec2 --no-connect` (default image looked up)",
                    counted(server, env, "create", "--driver", "ec2", "--no-connect", *CIDR, "m0"))]
        for i in range(1, args.machines):
            pymachine(env, "create", "--driver", "ec2", "--no-connect", *CIDR, f"m{i}")
        rows.append(row(f"`ls` of {args.machines} EC2 machines (one region)", counted(server, env, "ls")))
        rows.append(row("`status m0`", counted(server, env, "status", "m0")))
        rows.append(row("`stop m0`", counted(server, env, "stop", "m0")))
        rows.append(row("`kill m0`", counted(server, env, "kill", "m0")))
        rows.append(row("`rm -y m0`", counted(server, env, "rm", "-y", "m0")))
        names = [f"m{i}" for i in range(1, args.machines)]
        rows.append(row(f"`rm -y` of {len(names)} machines", counted(server, env, "rm", "-y", *names)))
    table = "\n".join(["| command | EC2 API calls | which |", "|---|---|---|", *rows])
    print(table)
    (ROOT / "bench/results/ec2_calls.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
