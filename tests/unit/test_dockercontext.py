"""The machine's docker context, through the real docker CLI (in a DOCKER_CONFIG of the test's own)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from machine import dockercontext
from machine.certs import ensure_ca

pytestmark = pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker CLI")


@pytest.fixture
def config(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    return tmp_path / "docker-config"


def certs(directory: Path, store: Path) -> Path:
    """The machine directory's ca.pem, cert.pem and key.pem (DOCKER_CERT_PATH), from the store's CA in `store`."""
    store.mkdir(parents=True, exist_ok=True)
    ca, client = ensure_ca(store)
    directory.mkdir(parents=True, exist_ok=True)
    for source, target in ((ca.cert, "ca.pem"), (client.cert, "cert.pem"), (client.key, "key.pem")):
        shutil.copyfile(source, directory / target)
    return directory


def inspect(name: str) -> dict:
    out = subprocess.run(["docker", "context", "inspect", name], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


def kept(name: str, file: str) -> str:
    return (Path(inspect(name)["Storage"]["TLSPath"]) / "docker" / file).read_text()


def test_an_unchanged_context_is_left_alone_and_a_changed_one_is_rewritten(config, tmp_path):
    machine = certs(tmp_path / "web", tmp_path / "store")
    assert dockercontext.save("web", "tcp://127.0.0.1:2376", machine)
    assert kept("web", "cert.pem") == (machine / "cert.pem").read_text()
    meta = Path(inspect("web")["Storage"]["MetadataPath"]) / "meta.json"
    written = meta.stat().st_mtime_ns

    assert dockercontext.save("web", "tcp://127.0.0.1:2376", machine)
    assert meta.stat().st_mtime_ns == written  # nothing to change: not written again
    with pytest.MonkeyPatch.context() as no_cli:
        no_cli.setenv("PATH", str(tmp_path / "empty"))
        assert dockercontext.save("web", "tcp://127.0.0.1:2376", machine)  # found up to date without the CLI

    certs(machine, tmp_path / "another store")  # as after the store's CA was made again
    assert dockercontext.save("web", "tcp://127.0.0.1:2376", machine)
    assert kept("web", "cert.pem") == (machine / "cert.pem").read_text()
    assert kept("web", "ca.pem") == (tmp_path / "another store" / "ca.pem").read_text()

    assert dockercontext.save("web", "tcp://127.0.0.1:12376", machine)  # the engine moved
    assert inspect("web")["Endpoints"]["docker"]["Host"] == "tcp://127.0.0.1:12376"

    dockercontext.remove("web", machine)
    assert subprocess.run(["docker", "context", "inspect", "web"], capture_output=True).returncode != 0


def test_a_context_someone_else_made_is_never_touched(config, tmp_path):
    subprocess.run(["docker", "context", "create", "web", "--docker", "host=tcp://127.0.0.1:1"], check=True,
                   capture_output=True)
    machine = certs(tmp_path / "web", tmp_path / "store")
    assert not dockercontext.save("web", "tcp://127.0.0.1:2376", machine)
    dockercontext.remove("web", machine)
    assert inspect("web")["Endpoints"]["docker"]["Host"] == "tcp://127.0.0.1:1"


def test_a_machine_of_the_same_name_in_another_store_leaves_the_context_alone(config, tmp_path):
    # A molecule scenario's instance `web`, or one of another PYMACHINE_HOME: the user's machine keeps its context.
    users = certs(tmp_path / "home/machines/web", tmp_path / "home/certs")
    assert dockercontext.save("web", "tcp://127.0.0.1:2376", users)
    other = certs(tmp_path / "scenario/machines/web", tmp_path / "scenario/certs")
    assert not dockercontext.save("web", "tcp://10.0.0.7:2376", other)
    dockercontext.remove("web", other)
    assert inspect("web")["Endpoints"]["docker"]["Host"] == "tcp://127.0.0.1:2376"
    assert inspect("web")["Metadata"]["Description"] == f"pymachine machine {users}"


@pytest.mark.parametrize("same_store", [True, False])
def test_a_context_made_before_descriptions_named_the_machine_is_its_store_s(config, tmp_path, same_store):
    machine = certs(tmp_path / "web", tmp_path / "store")
    ca = machine / "ca.pem" if same_store else certs(tmp_path / "other", tmp_path / "another store") / "ca.pem"
    subprocess.run(["docker", "context", "create", "web", "--description", "pymachine machine", "--docker",
                    f"host=tcp://127.0.0.1:1,ca={ca},cert={machine / 'cert.pem'},key={machine / 'key.pem'}"],
                   check=True, capture_output=True)
    assert dockercontext.save("web", "tcp://127.0.0.1:2376", machine) == same_store
    assert inspect("web")["Endpoints"]["docker"]["Host"] == ("tcp://127.0.0.1:2376" if same_store
                                                             else "tcp://127.0.0.1:1")


def test_a_reissued_client_certificate_reaches_the_machine_s_context(config, tmp_path):
    machine = certs(tmp_path / "home/machines/web", tmp_path / "home/certs")
    assert dockercontext.save("web", "tcp://127.0.0.1:2376", machine)
    _, client = ensure_ca(tmp_path / "home/certs", renew_client=True)
    for source, target in ((client.cert, "cert.pem"), (client.key, "key.pem")):
        shutil.copyfile(source, machine / target)
    dockercontext.refresh("web", machine)
    assert kept("web", "cert.pem") == client.cert.read_text()
    assert inspect("web")["Endpoints"]["docker"]["Host"] == "tcp://127.0.0.1:2376"
    dockercontext.refresh("other", machine)  # a machine without a context: nothing to do
