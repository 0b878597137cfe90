"""The engine API client against a real HTTPS server on 127.0.0.1 that demands the store's client certificate,
as dockerd with tlsverify does."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from machine import certs
from machine.engineapi import EngineAPI, EngineError
from machine.errors import MachineError


def store_ca(directory: Path) -> tuple[certs.Pair, certs.Pair]:
    directory.mkdir(exist_ok=True)
    return certs.ensure_ca(directory)


class Engine(http.server.ThreadingHTTPServer):
    """Answers from `replies` ((method, path) -> (status, JSON)); records each request and its client's CN."""

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.replies: dict[tuple[str, str], tuple[int, object]] = {}
        self.seen: list[dict[str, object]] = []


class Handler(http.server.BaseHTTPRequestHandler):
    server: Engine

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        peer = dict(x[0] for x in self.connection.getpeercert()["subject"])
        self.server.seen.append({"method": self.command, "path": self.path, "client": peer["commonName"],
                                 "body": json.loads(body) if body else None})
        status, reply = self.server.replies.get((self.command, self.path.partition("?")[0]), (404, {"message": "?"}))
        data = reply if isinstance(reply, bytes) else b"" if reply is None else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def cert_dir(tmp_path: Path) -> Path:
    """A store's CA and client certificate, laid out as DOCKER_CERT_PATH (what EngineAPI reads)."""
    ca, client = store_ca(tmp_path / "certs")
    target = tmp_path / "machine"
    target.mkdir()
    for source, name in ((ca.cert, "ca.pem"), (client.cert, "cert.pem"), (client.key, "key.pem")):
        shutil.copyfile(source, target / name)
    return target


@pytest.fixture
def engine(tmp_path: Path, cert_dir: Path) -> Iterator[Engine]:
    ca, _ = store_ca(tmp_path / "certs")
    server = certs.issue_server(ca, certs.Pair(tmp_path / "server.pem", tmp_path / "server-key.pem"), "m1", [])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(server.cert), str(server.key))
    context.load_verify_locations(str(ca.cert))
    context.verify_mode = ssl.CERT_REQUIRED  # dockerd's tlsverify: no client certificate, no answer
    httpd = Engine(context)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def client(engine: Engine, cert_dir: Path) -> EngineAPI:
    return EngineAPI("m1", f"tcp://127.0.0.1:{engine.server_port}", cert_dir)


def test_init_posts_the_addresses_with_the_client_certificate(engine, cert_dir):
    engine.replies[("POST", "/swarm/init")] = (200, "node-1")
    assert client(engine, cert_dir).swarm_init("10.0.0.5") == "node-1"
    assert engine.seen == [{"method": "POST", "path": "/swarm/init", "client": "pymachine client",
                            "body": {"ListenAddr": "0.0.0.0:2377", "AdvertiseAddr": "10.0.0.5"}}]


def test_join_leave_and_node_removal_send_what_the_engine_expects(engine, cert_dir):
    for call in (("POST", "/swarm/join"), ("POST", "/swarm/leave"), ("DELETE", "/nodes/n2")):
        engine.replies[call] = (200, None)
    api = client(engine, cert_dir)
    api.swarm_join("10.0.0.6", ["10.0.0.5:2377"], "SWMTKN-1-secret")
    api.swarm_leave(force=True)
    api.remove_node("n2")
    assert [(s["method"], s["path"]) for s in engine.seen] == [
        ("POST", "/swarm/join"), ("POST", "/swarm/leave?force=true"), ("DELETE", "/nodes/n2?force=true")]
    assert engine.seen[0]["body"] == {"ListenAddr": "0.0.0.0:2377", "AdvertiseAddr": "10.0.0.6",
                                      "RemoteAddrs": ["10.0.0.5:2377"], "JoinToken": "SWMTKN-1-secret"}


def test_a_role_change_reads_the_node_and_updates_its_spec_at_that_version(engine, cert_dir):
    spec = {"Role": "manager", "Availability": "active"}
    engine.replies[("GET", "/nodes/n2")] = (200, {"ID": "n2", "Version": {"Index": 7}, "Spec": {"Role": "worker"}})
    engine.replies[("POST", "/nodes/n2/update")] = (200, None)
    api = client(engine, cert_dir)
    assert api.node("n2")["Version"]["Index"] == 7
    api.update_node("n2", 7, spec)
    assert [(s["method"], s["path"]) for s in engine.seen] == [("GET", "/nodes/n2"),
                                                                ("POST", "/nodes/n2/update?version=7")]
    assert engine.seen[1]["body"] == spec


def test_an_engine_refusal_is_one_line_quoting_its_message(engine, cert_dir):
    engine.replies[("GET", "/swarm")] = (503, {"message": "This node is not a swarm manager."})
    with pytest.raises(EngineError) as caught:
        client(engine, cert_dir).swarm()
    assert caught.value.status == 503
    assert str(caught.value) == "the engine of m1 refused GET /swarm: This node is not a swarm manager."


def test_an_answer_that_is_not_json_is_one_line(engine, cert_dir):
    engine.replies[("GET", "/info")] = (200, b"<html>a proxy's page</html>")
    with pytest.raises(MachineError, match=r"^the engine of m1 answered GET /info with something that is not JSON: "
                                           r"<html>a proxy's page</html>$"):
        client(engine, cert_dir).info()


def test_a_server_not_signed_by_the_stores_ca_is_refused(engine, cert_dir, tmp_path):
    other_ca, _ = store_ca(tmp_path / "other")
    shutil.copyfile(other_ca.cert, cert_dir / "ca.pem")
    with pytest.raises(MachineError, match=r"^the engine of m1 at 127\.0\.0\.1:\d+ refused TLS: CERTIFICATE_VERIFY"):
        client(engine, cert_dir).info()
    assert engine.seen == []


@pytest.mark.parametrize(("family", "host", "shown"), [(socket.AF_INET, "127.0.0.1", "127.0.0.1"),
                                                      (socket.AF_INET6, "::1", "[::1]")])
def test_an_engine_that_does_not_listen_is_one_line(cert_dir, family, host, shown):
    with socket.socket(family) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    url_host = f"[{host}]" if ":" in host else host
    with pytest.raises(MachineError, match=rf"^cannot reach the engine of m1 at {re.escape(shown)}:{port}: "
                                           r"Connection refused$"):
        EngineAPI("m1", f"tcp://{url_host}:{port}", cert_dir).info()


def test_a_machine_without_an_engine_url_is_refused(cert_dir):
    with pytest.raises(MachineError, match="m1 has no engine URL"):
        EngineAPI("m1", "", cert_dir)
