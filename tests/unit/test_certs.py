"""Mutual TLS with the generated material, over a real loopback handshake."""

import os
import socket
import ssl
import threading

import pytest

from machine import certs


@pytest.fixture
def material(tmp_path):
    (tmp_path / "certs").mkdir()
    ca, client = certs.ensure_ca(tmp_path / "certs")
    server = certs.issue_server(ca, certs.Pair(tmp_path / "server.pem", tmp_path / "server-key.pem"), "web1",
                                ["10.0.0.5", "web1.example"])
    return ca, client, server


def test_ca_is_made_once_and_keys_are_private(tmp_path, material):
    ca, client, server = material
    before = ca.cert.read_bytes()
    assert certs.ensure_ca(tmp_path / "certs")[0].cert.read_bytes() == before
    for key in (ca.key, client.key, server.key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert certs.sans_of(server.cert) == {"web1", "localhost", "127.0.0.1", "10.0.0.5", "web1.example"}


def test_the_names_kept_beside_a_certificate_are_the_ones_it_carries(tmp_path, material):
    """`env` reads the kept names (no cryptography to import); they must say what the certificate says."""
    _, _, server = material
    kept = certs.sans_of(server.cert)
    server.cert.with_name("server.pem.names").unlink()
    assert certs.sans_of(server.cert) == kept  # read from the certificate itself
    server.cert.with_name("server.pem.names").write_text('["somewhere.else"]')
    later = server.cert.stat().st_mtime + 5
    os.utime(server.cert, (later, later))  # a certificate newer than its names (replaced by hand): it wins
    assert certs.sans_of(server.cert) == kept


def _serve_once(server_ctx: ssl.SSLContext, listener: socket.socket, outcome: list):
    conn, _ = listener.accept()
    try:
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"ok")
            outcome.append("accepted")
    except (ssl.SSLError, OSError) as e:
        outcome.append(f"refused: {e}")


def _handshake(ca, server, client_pair) -> tuple[bool, list]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.cert))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_cert_chain(str(server.cert), str(server.key))
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: list = []
    thread = threading.Thread(target=_serve_once, args=(server_ctx, listener, outcome))
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(ca.cert))
    if client_pair:
        client_ctx.load_cert_chain(str(client_pair.cert), str(client_pair.key))
    try:
        with socket.create_connection(listener.getsockname()) as raw, \
                client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            ok = tls.recv(2) == b"ok"
    except (ssl.SSLError, OSError):
        ok = False
    thread.join(5)
    listener.close()
    return ok, outcome


def test_mutual_tls_accepts_our_client_and_refuses_others(tmp_path, material):
    ca, client, server = material
    assert _handshake(ca, server, client) == (True, ["accepted"])
    ok, outcome = _handshake(ca, server, None)
    assert not ok and outcome[0].startswith("refused")
    (tmp_path / "other").mkdir()
    _, stranger = certs.ensure_ca(tmp_path / "other")
    ok, outcome = _handshake(ca, server, stranger)
    assert not ok and outcome[0].startswith("refused")
