"""Docker swarm mode across three local machines, through `pymachine swarm` and the real docker CLI.

This kernel has VXLAN but no IP_VS: services use `--endpoint-mode dnsrr` (no virtual IP, no routing mesh), and
their tasks reach each other over the overlay network by the service's name. Images are built FROM scratch on
every node (there is no registry to pull from).
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass

import pytest

from tests.conftest import CLI
from tests.integration.conftest import FLEET, busybox_image, docker, docker_env

pytestmark = pytest.mark.integration

MANAGER, WORKERS = FLEET[0], FLEET[1:]
IMAGE = "pm-busybox"
# Each task answers one TCP connection at a time with the name of the node it runs on.
ANSWER = "while true; do hostname | nc -l -p 8080; done"


@dataclass
class Swarm:
    cli: CLI
    shown: str  # all that `swarm init` and `swarm join` printed


@pytest.fixture(scope="module")
def swarm(fleet: CLI, tmp_path_factory: pytest.TempPathFactory) -> Swarm:
    """The fleet as one swarm (its first machine the manager), with the busybox image built on every node."""
    made = [fleet("swarm", "init", MANAGER), fleet("swarm", "join", *WORKERS, "--manager", MANAGER)]
    context = busybox_image(tmp_path_factory.mktemp("image"))
    builds = [subprocess.Popen([*fleet.prefix, "docker", "build", "-q", "-t", IMAGE, str(context)],
                               env=docker_env(fleet, name), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for name in FLEET]
    for proc in builds:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    return Swarm(fleet, "".join(p.stdout + p.stderr for p in made))


def nodes(cli: CLI) -> dict[str, tuple[str, str]]:
    """Machine -> (role, state) of the swarm's nodes, as `pymachine swarm ls` shows them."""
    rows = json.loads(cli("swarm", "ls", "--format", "json", MANAGER).stdout)
    return {r["machine"]: (r["role"], r["state"]) for r in rows}


def running_tasks(cli: CLI, service: str, count: int) -> list[str]:
    """The nodes of the service's running tasks, once `count` of them run (waited for generously: busy CI)."""
    deadline = time.monotonic() + 300
    while True:
        out = docker(cli, MANAGER, "service", "ps", service, "--filter", "desired-state=running",
                     "--format", "{{.Node}} {{.CurrentState}}")
        found = sorted(line.split()[0] for line in out.splitlines() if " Running " in f" {line} ")
        if len(found) == count or time.monotonic() > deadline:
            return found
        time.sleep(2)


def answers(cli: CLI, machine: str, service: str, expected: set[str]) -> set[str]:
    """From a task of the service on `machine`: the names the tasks its name resolves to answer with, asked until
    they are `expected` (the service's DNS entries follow its tasks within seconds; busy CI: waited generously)."""
    task = docker(cli, machine, "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}").split()[0]
    script = (f"for ip in $(busybox nslookup {service} | busybox sed -n 's/^Address: //p'); do "
              "busybox nc -w 10 $ip 8080 </dev/null; done")
    deadline = time.monotonic() + 120
    while True:
        found = set(docker(cli, machine, "exec", task, "busybox", "sh", "-c", script).split())
        if found == expected or time.monotonic() > deadline:
            return found
        time.sleep(2)


def test_three_machines_form_a_swarm_and_no_token_is_shown_or_kept(swarm):
    cli = swarm.cli
    assert nodes(cli) == {MANAGER: ("manager", "ready"), **{w: ("worker", "ready") for w in WORKERS}}
    for worker in WORKERS:
        info = json.loads(docker(cli, worker, "info", "--format", "{{json .Swarm}}"))
        assert info["LocalNodeState"] == "active" and not info["ControlAvailable"]
        assert info["NodeAddr"] == cli("ip", worker).stdout.strip()  # the driver's address is advertised
    assert "SWMTKN" not in swarm.shown
    kept = subprocess.run(["grep", "-rl", "SWMTKN", str(cli.home)], capture_output=True, text=True)
    assert kept.returncode == 1, kept.stdout  # grep found nothing in the store


def test_a_worker_promoted_manages_and_demoted_works_again(swarm):
    cli, worker = swarm.cli, WORKERS[0]
    cli("swarm", "promote", worker)
    assert nodes(cli)[worker] == ("manager", "ready")
    assert json.loads(docker(cli, worker, "info", "--format", "{{json .Swarm}}"))["ControlAvailable"]
    cli("swarm", "demote", worker)
    assert nodes(cli) == {MANAGER: ("manager", "ready"), **{w: ("worker", "ready") for w in WORKERS}}


def test_a_service_spreads_and_its_tasks_reach_each_other_over_the_overlay(swarm):
    cli = swarm.cli
    docker(cli, MANAGER, "network", "create", "--driver", "overlay", "pmnet")
    docker(cli, MANAGER, "service", "create", "--detach", "--name", "web", "--replicas", "3", "--network", "pmnet",
           "--endpoint-mode", "dnsrr", "--no-resolve-image", "--hostname", "{{.Node.Hostname}}",
           "--placement-pref", "spread=node.id", IMAGE, "sh", "-c", ANSWER)
    assert running_tasks(cli, "web", 3) == sorted(FLEET)
    assert answers(cli, MANAGER, "web", set(FLEET)) == set(FLEET)


def test_build_ship_run_an_image_through_a_registry_as_a_service_every_node_pulls(swarm, tmp_path):
    """Built on one node, pushed to the registry on another (TLS, the store's CA: no insecure registries), run as a
    service with a task on every node: the nodes that did not build it pulled it."""
    cli = swarm.cli
    cli("provision", "--registry", MANAGER)
    shipped = f"{cli('ip', MANAGER).stdout.strip()}:5000/shipped:1"
    docker(cli, WORKERS[0], "build", "-q", "-t", shipped, str(busybox_image(tmp_path)))
    docker(cli, WORKERS[0], "push", shipped)
    docker(cli, MANAGER, "service", "create", "--detach", "--name", "shipped", "--replicas", "3",
           "--endpoint-mode", "dnsrr", "--placement-pref", "spread=node.id", shipped, "sh", "-c", ANSWER)
    assert running_tasks(cli, "shipped", 3) == sorted(FLEET)
    repository = shipped.rsplit(":", 1)[0]  # a service's image is pulled by digest: untagged
    for node in FLEET:
        assert docker(cli, node, "image", "ls", "-q", repository).strip(), f"{node} has no image of {repository}"
    docker(cli, MANAGER, "service", "rm", "shipped")


STACK = """\
version: "3.8"
services:
  server:
    image: {image}
    command: ["sh", "-c", "echo hello from the stack > /srv/index.html && exec httpd -f -p 8080 -h /srv"]
    volumes: ["site:/srv"]
    deploy: {{endpoint_mode: dnsrr}}
  client:
    image: {image}
    command: ["sh", "-c", "while true; do wget -q -O - http://server:8080/index.html; sleep 1; done"]
    deploy: {{endpoint_mode: dnsrr}}
volumes:
  site: {{}}
"""


def test_docker_stack_deploy_runs_a_two_service_application_on_the_swarm(swarm, tmp_path):
    """`docker stack deploy` from the user's host through `pymachine env`: the client reaches the server by name."""
    cli = swarm.cli
    shipped = f"{cli('ip', MANAGER).stdout.strip()}:5000/shipped:1"  # pushed by the test before
    (tmp_path / "stack.yml").write_text(STACK.format(image=shipped))
    docker(cli, MANAGER, "stack", "deploy", "-c", str(tmp_path / "stack.yml"), "app")
    deadline = time.monotonic() + 300
    while "hello from the stack" not in (logs := docker(cli, MANAGER, "service", "logs", "--raw", "app_client")):
        assert time.monotonic() < deadline, f"the client never reached the server:\n{logs[-2000:]}"
        time.sleep(3)
    docker(cli, MANAGER, "stack", "rm", "app")


def test_a_node_that_leaves_has_its_task_rescheduled_on_the_others(swarm):
    cli = swarm.cli
    leaving = WORKERS[-1]
    cli("swarm", "leave", leaving)
    assert nodes(cli) == {MANAGER: ("manager", "ready"), WORKERS[0]: ("worker", "ready")}
    assert json.loads(docker(cli, leaving, "info", "--format", "{{json .Swarm.LocalNodeState}}")) == "inactive"
    placed = running_tasks(cli, "web", 3)
    assert len(placed) == 3 and set(placed) == {MANAGER, WORKERS[0]}
    assert answers(cli, MANAGER, "web", {MANAGER, WORKERS[0]}) == {MANAGER, WORKERS[0]}


@pytest.mark.parametrize("args, message", [
    (("swarm", "init", MANAGER), f"{MANAGER} is already in a swarm"),
    (("swarm", "join", WORKERS[0], "--manager", MANAGER), f"{WORKERS[0]} is already in the swarm of {MANAGER}"),
    (("swarm", "join", WORKERS[-1], "--manager", WORKERS[0]), f"{WORKERS[0]} is a worker of its swarm, not a manager"),
    (("swarm", "leave", WORKERS[-1]), f"{WORKERS[-1]} is not in a swarm"),
    (("swarm", "leave", MANAGER), "refused POST /swarm/leave: You are attempting to leave the swarm on a node that "
                                  "is participating as a manager"),
    (("swarm", "ls", WORKERS[-1]), f"{WORKERS[-1]} is not in a swarm"),
    (("swarm", "demote", MANAGER), f"{MANAGER} is the last manager of its swarm"),
    (("swarm", "join", WORKERS[-1], "--manager", "nosuch"), "nosuch"),
])
def test_refusals_are_one_line_and_change_nothing(swarm, args, message):
    before = nodes(swarm.cli)
    proc = swarm.cli(*args, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("pymachine: error: ") and message in proc.stderr
    assert nodes(swarm.cli) == before


def test_a_join_that_fails_leaves_the_machine_in_no_swarm(swarm):
    """The engine gives up waiting after 20 s but goes on trying in the background (pending, then error), and
    refuses any other join meanwhile: a failed join is ended, so that the next one can work."""
    cli, node = swarm.cli, WORKERS[-1]
    block = f"-p tcp --dport 2377 -s {cli('ip', node).stdout.strip()} -j DROP"
    cli("ssh", MANAGER, "--", f"iptables -I INPUT {block}")
    try:
        proc = cli("swarm", "join", node, "--manager", MANAGER, check=False)
    finally:
        cli("ssh", MANAGER, "--", f"iptables -D INPUT {block}")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.endswith(f"(pymachine ended that attempt: {node} is in no swarm)\n")
    assert json.loads(docker(cli, node, "info", "--format", "{{json .Swarm.LocalNodeState}}")) == "inactive"
    assert node not in nodes(cli)


def test_an_active_ufw_gets_the_swarm_ports_and_a_node_joins_through_it(swarm):
    cli, node = swarm.cli, WORKERS[-1]
    # A host firewall that denies every other incoming connection (SSH and the engine let through).
    cli("ssh", node, "--", "DEBIAN_FRONTEND=noninteractive apt-get install -y -q ufw >/dev/null && "
                           "ufw allow 22/tcp && ufw allow 2376/tcp && ufw --force enable")
    first = cli("provision", "--tags", "firewall", node)
    assert f"changed: [{node}] => engine : Open the swarm ports in ufw" in first.stdout + first.stderr
    rules = cli("ssh", node, "--", "ufw status").stdout
    assert all(any(line.split()[:2] == [port, "ALLOW"] for line in rules.splitlines())
               for port in ("2377/tcp", "7946/tcp", "7946/udp", "4789/udp")), rules
    again = cli("provision", "--tags", "firewall", node)
    assert " changed=0 " in again.stdout + again.stderr
    cli("swarm", "join", node, "--manager", MANAGER, "--as-manager")  # managers reach it on 2377 too
    assert nodes(cli)[node] == ("manager", "ready")


def test_rm_of_a_manager_leaves_the_swarm_first(swarm):
    """Removed without leaving, a node stays listed (Down) for good and a manager's vote stays in the quorum: `rm`
    demotes it through another manager and takes it out of the swarm first."""
    cli = swarm.cli
    cli("create", "--engine-install", "distro", "node4", timeout=900)
    cli("swarm", "join", "node4", "--manager", MANAGER, "--as-manager")
    cli("rm", "-y", "node4")
    rows = json.loads(cli("swarm", "ls", "--format", "json", MANAGER).stdout)
    assert "node4" not in {r["hostname"] for r in rows}
    assert nodes(cli)[MANAGER] == ("manager", "ready")


def test_a_machine_without_an_engine_or_not_running_is_named(swarm):
    cli = swarm.cli
    cli("create", "--no-provision", "bare")
    proc = cli("swarm", "join", "bare", "--manager", MANAGER, check=False)
    assert (proc.returncode, proc.stderr) == (1, "pymachine: error: bare: machine 'bare' has no engine certificates "
                                                 "yet (run `pymachine provision bare`)\n")
    cli("stop", WORKERS[-1])  # the module's last test: it stays stopped until the fleet is removed
    proc = cli("swarm", "leave", WORKERS[-1], check=False)
    assert (proc.returncode, proc.stderr) == (1, f"pymachine: error: {WORKERS[-1]}: machine {WORKERS[-1]!r} is not "
                                                 f"running (start it with `pymachine start {WORKERS[-1]}`)\n")
