"""Build, Ship, Run across machines: an image built on one machine, pushed to the private registry of a second
(TLS verified with the store's CA, no insecure-registry setting), run on a third, and a Compose application
whose image comes from that registry.

The three machines are shared by every test here: `before` is made before the registry exists, `registry`
gets it with `provision --registry`, `after` is made once it exists, so both orders of creation are covered.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.conftest import CLI
from tests.integration.conftest import busybox_image, docker, docker_env, machine_cli, machine_record

pytestmark = pytest.mark.integration

IMAGE = "pm/busybox:1"


@dataclass(frozen=True)
class Fleet:
    cli: CLI
    before: str
    registry: str
    after: str

    @property
    def names(self) -> tuple[str, str, str]:
        return self.before, self.registry, self.after

    def image(self) -> str:
        """The test image as named in the registry: REGISTRY_IP:5000/…"""
        return f"{self.cli('ip', self.registry).stdout.strip()}:5000/{IMAGE}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    """Three machines with Debian's engine; m2 runs the registry, added after m1 was made and before m3."""
    tmp = tmp_path_factory.mktemp("registry")
    with contextlib.contextmanager(machine_cli)(tmp / "home", DOCKER_CONFIG=str(tmp / "docker-config"),
                                                DOCKER_BUILDKIT="0") as cli:
        fleet = Fleet(cli, "m1", "m2", "m3")

        def create(name: str) -> None:
            cli("create", "--engine-install", "distro", name, timeout=1200)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(create, (fleet.before, fleet.registry)))
        cli("provision", "--registry", fleet.registry, timeout=900)
        create(fleet.after)
        yield fleet


def _registry_get(fleet: Fleet, path: str) -> dict:
    """GET on the registry's API from the user's host, verified against the store's CA only."""
    context = ssl.create_default_context(cafile=fleet.cli.home / "certs" / "ca.pem")
    ip = fleet.cli("ip", fleet.registry).stdout.strip()
    with urllib.request.urlopen(f"https://{ip}:5000{path}", context=context, timeout=30) as response:
        return json.loads(response.read())


def _docker_try(fleet: Fleet, machine: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], env=docker_env(fleet.cli, machine), capture_output=True, text=True,
                          timeout=300)


def test_an_image_built_on_one_machine_runs_on_another_through_the_registry(fleet, tmp_path):
    image = fleet.image()
    docker(fleet.cli, fleet.before, "build", "-q", "-t", image, str(busybox_image(tmp_path)))
    docker(fleet.cli, fleet.before, "push", image)
    assert IMAGE.split(":")[0] in _registry_get(fleet, "/v2/_catalog")["repositories"]

    assert _docker_try(fleet, fleet.after, "image", "inspect", image).returncode != 0  # not there before the run
    out = docker(fleet.cli, fleet.after, "run", "--rm", image, "echo", "built, shipped, run")
    assert out.strip() == "built, shipped, run"
    for machine in fleet.names:  # trusted through certs.d, never as an insecure registry
        info = json.loads(docker(fleet.cli, machine, "info", "--format", "{{json .RegistryConfig}}"))
        assert info["InsecureRegistryCIDRs"] == ["127.0.0.0/8"], info


def test_an_engine_without_the_ca_refuses_the_registry_until_provisioned(fleet):
    image = fleet.image()
    registry = image.split("/")[0]
    fleet.cli("ssh", fleet.after, "--", f"rm -r /etc/docker/certs.d/{registry}")
    _docker_try(fleet, fleet.after, "rmi", image)
    refused = _docker_try(fleet, fleet.after, "pull", image)
    assert refused.returncode != 0 and "certificate signed by unknown authority" in refused.stderr, refused.stderr

    fleet.cli("provision", fleet.after)
    docker(fleet.cli, fleet.after, "pull", image)


def test_the_registry_is_recorded_and_provisioning_keeps_it(fleet):
    assert machine_record(fleet.cli, fleet.registry)["engine"]["registry_enabled"] is True
    assert not machine_record(fleet.cli, fleet.before)["engine"]["registry_enabled"]
    fleet.cli("ssh", fleet.registry, "--", "systemctl stop docker-registry")
    again = fleet.cli("provision", fleet.registry).stdout
    assert " failed=0 " in again, again
    assert _registry_get(fleet, "/v2/") == {}


def test_a_registry_at_new_addresses_is_trusted_there_by_every_machine(fleet):
    """The registry's machine has new addresses (a VM's new lease, a host renumbered): its next provisioning
    issues the registry's certificate for them, and every other machine is made to trust the registry there."""
    trust = f"/etc/docker/certs.d/{fleet.cli('ip', fleet.registry).stdout.strip()}:5000/ca.crt"
    fleet.cli("ssh", fleet.before, "--", f"rm -r {trust.removesuffix('/ca.crt')}")
    # As pymachine keeps it beside the certificate: the names it was issued for, here an address the machine had.
    names = fleet.cli.home / "machines" / fleet.registry / "registry.pem.names"
    names.write_text(json.dumps([fleet.registry, "localhost", "127.0.0.1", "192.0.2.7"]))
    fleet.cli("provision", fleet.registry)
    assert "192.0.2.7" not in names.read_text()  # issued again, for the machine's addresses
    assert fleet.cli("ssh", fleet.before, "--", f"cat {trust}").stdout == \
        (fleet.cli.home / "certs" / "ca.pem").read_text()


COMPOSE = """\
services:
  web:
    image: {image}
    command: [httpd, -f, -p, "8080", -h, /www]
    volumes: [site:/www]
  client:
    image: {image}
    command: [sh, -c, "until wget -qO- http://web:8080/index.html; do sleep 1; done"]
    depends_on: [web]
    profiles: [client]
volumes:
  site: {{}}
"""


def test_compose_runs_an_application_whose_volume_outlives_down(fleet, tmp_path):
    """docker-compose 1.29 from the user's host through `pymachine env`, its image pulled from the registry."""
    (tmp_path / "docker-compose.yml").write_text(COMPOSE.format(image=fleet.image()))
    machine = fleet.after
    env_cmd = fleet.cli("env", machine)
    env = docker_env(fleet.cli, machine)
    if any(env.get(name) for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")):
        assert "env -u REQUESTS_CA_BUNDLE -u CURL_CA_BUNDLE docker-compose" in env_cmd.stderr, env_cmd.stderr
    # As the README says: without these, Python's requests keeps the machine's CA that docker-compose gives it.
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env.pop(name, None)

    def compose(*args: str) -> str:
        proc = subprocess.run(["docker-compose", "-p", "shop", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, f"docker-compose {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    try:
        compose("run", "--rm", "-T", "--no-deps", "web", "sh", "-c", "echo kept in a volume > /www/index.html")
        compose("up", "-d", "web")
        assert compose("run", "--rm", "-T", "client").strip() == "kept in a volume"  # reached by its service name
        compose("down")
        assert "shop_site" in docker(fleet.cli, machine, "volume", "ls", "--format", "{{.Name}}").split()
        compose("up", "-d", "web")
        assert compose("run", "--rm", "-T", "client").strip() == "kept in a volume"
    finally:
        subprocess.run(["docker-compose", "-p", "shop", "--profile", "client", "down", "-v"], cwd=tmp_path, env=env,
                       capture_output=True, timeout=300)
    assert "shop_site" not in docker(fleet.cli, machine, "volume", "ls", "--format", "{{.Name}}").split()


def test_a_registry_runs_from_its_image_when_the_engine_has_it(fleet, tmp_path):
    """`auto` runs Docker's registry image when the engine already has it (no Docker Hub here: a `registry:2` is
    made of the package machine's registry, the same distribution 2 software, with the libraries it loads)."""
    files = "/usr/bin/docker-registry $(ldd /usr/bin/docker-registry | grep -o '/[^ ]*')"
    fleet.cli("ssh", fleet.registry, "--", f"tar -chf /tmp/registry.tar {files} 2>/dev/null")
    fleet.cli("scp", f"{fleet.registry}:/tmp/registry.tar", str(tmp_path))
    docker(fleet.cli, fleet.before, "import", "--change", 'ENTRYPOINT ["/usr/bin/docker-registry", "serve"]',
           "--change", 'CMD ["/etc/docker/registry/config.yml"]', str(tmp_path / "registry.tar"), "registry:2")

    fleet.cli("provision", "--registry", fleet.before)
    state = fleet.cli("ssh", fleet.before, "--", "systemctl is-active pymachine-registry; "
                      "dpkg-query -W docker-registry 2>/dev/null || echo no package").stdout
    assert state.splitlines() == ["active", "no package"], state
    again = fleet.cli("provision", fleet.before).stdout
    assert " changed=0 " in again, again

    # A machine made before this registry was added trusts it: m3 pushes there, TLS verified.
    moved = f"{fleet.cli('ip', fleet.before).stdout.strip()}:5000/{IMAGE}"
    docker(fleet.cli, fleet.after, "tag", fleet.image(), moved)
    docker(fleet.cli, fleet.after, "push", moved)
