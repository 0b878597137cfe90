"""Mutual TLS with the generated material, over a real loopback handshake."""

import datetime
import os
import shutil
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from machine import certs
from machine.commands.engine import _tls_material, renew_client_cert
from machine.store import Machine, Store


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


# -- renewal: certificates made to end soon, or already ended, as time would leave them ------------------------
def ending_in(pair: certs.Pair, ca: certs.Pair, days: float) -> bytes:
    """Re-sign `pair`'s certificate (same key, names and CA) to end `days` from now (negative: it has ended). Its
    kept end is dropped, as for a certificate issued before ends were kept: the certificate itself then tells."""
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1000))
               .not_valid_after(now + datetime.timedelta(days=days)))
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    pair.cert.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    pair.cert.with_name(pair.cert.name + ".expires").unlink(missing_ok=True)
    return pair.cert.read_bytes()


def test_the_end_kept_beside_a_certificate_is_the_one_it_carries(material):
    _, client, server = material
    for pair in (client, server):
        kept = float(pair.cert.with_name(pair.cert.name + ".expires").read_text())
        assert kept == x509.load_pem_x509_certificate(pair.cert.read_bytes()).not_valid_after_utc.timestamp()
        assert not certs.expiring(pair.cert)
        assert certs.expiring(pair.cert, days=2000)


@pytest.mark.parametrize("what", ["expires", "names"])
def test_what_a_certificate_issued_before_it_was_kept_carries_is_read_once(material, monkeypatch, what):
    # A machine provisioned by an older pymachine: its next provisioning keeps the end and the names, and the ones
    # after it need no cryptography to check them.
    _, _, server = material
    kept = server.cert.with_name(f"{server.cert.name}.{what}")
    before = kept.read_text()
    kept.unlink()
    check = (lambda: certs.expiring(server.cert)) if what == "expires" else (lambda: certs.sans_of(server.cert))
    answer = check()
    assert kept.read_text() == before
    monkeypatch.setattr(certs, "_load", lambda path: pytest.fail("read the certificate again"))
    assert check() == answer


@pytest.mark.parametrize("days", [-1, 10])
def test_an_ended_or_ending_client_certificate_is_reissued_by_the_same_ca(tmp_path, material, days):
    ca, client, server = material
    ca_before, old = ca.cert.read_bytes(), ending_in(client, ca, days)
    if days < 0:  # the user-visible failure: the engine refuses the ended certificate
        assert _handshake(ca, server, client)[0] is False
    certs.ensure_ca(tmp_path / "certs")
    assert client.cert.read_bytes() != old and ca.cert.read_bytes() == ca_before
    assert not certs.expiring(client.cert)
    # An engine whose certificate the CA issued before keeps accepting the client: nothing else to redo.
    assert _handshake(ca, server, client) == (True, ["accepted"])
    renewed = client.cert.read_bytes()
    certs.ensure_ca(tmp_path / "certs")
    assert client.cert.read_bytes() == renewed  # valid for long: left alone
    certs.ensure_ca(tmp_path / "certs", renew_client=True)
    assert client.cert.read_bytes() != renewed


class _Driver:
    """What _tls_material asks of a driver."""

    def cert_names(self) -> list[str]:
        return ["10.0.0.5"]


def _machine(store: Store, name: str) -> Machine:
    with store.reserve(name, "generic", {"generic_ip_address": "10.0.0.5"}) as machine:
        return machine


def test_provisioning_reissues_ending_certificates_and_every_machine_of_the_ca_gets_the_client_one(tmp_path):
    store = Store(tmp_path / "home")
    web1, web2, imported = _machine(store, "web1"), _machine(store, "web2"), _machine(store, "dm1")
    for machine in (web1, web2):
        _tls_material(store, machine, _Driver(), renew=False)
    # A machine imported from docker-machine keeps docker-machine's CA and client certificate.
    (tmp_path / "dm-certs").mkdir()
    dm_ca, dm_client = certs.ensure_ca(tmp_path / "dm-certs")
    for source, name in ((dm_ca.cert, "ca.pem"), (dm_client.cert, "cert.pem"), (dm_client.key, "key.pem")):
        shutil.copyfile(source, imported.dir / name)
    imported_files = {f: (imported.dir / f).read_bytes() for f in ("ca.pem", "cert.pem", "key.pem")}
    ca = certs.Pair(store.certs_dir / "ca.pem", store.certs_dir / "ca-key.pem")
    client = certs.Pair(store.certs_dir / "cert.pem", store.certs_dir / "key.pem")
    server = certs.server_pair(web1.dir)
    old_client, old_server = ending_in(client, ca, -1), ending_in(server, ca, 20)

    _tls_material(store, web1, _Driver(), renew=False)
    assert server.cert.read_bytes() != old_server and not certs.expiring(server.cert)
    assert client.cert.read_bytes() != old_client and not certs.expiring(client.cert)
    for machine in (web1, web2):  # DOCKER_CERT_PATH: web2's copy follows without its own provisioning
        assert (machine.dir / "cert.pem").read_bytes() == client.cert.read_bytes()
        assert (machine.dir / "key.pem").read_bytes() == client.key.read_bytes()
    assert {f: (imported.dir / f).read_bytes() for f in imported_files} == imported_files

    # regenerate-certs: the server certificate always; the client's only when asked (--client-certs).
    server_pem, client_pem = server.cert.read_bytes(), client.cert.read_bytes()
    _tls_material(store, web1, _Driver(), renew=True)
    assert server.cert.read_bytes() != server_pem and client.cert.read_bytes() == client_pem
    renew_client_cert(store)
    assert client.cert.read_bytes() != client_pem
    assert (web2.dir / "cert.pem").read_bytes() == client.cert.read_bytes()


def test_a_check_mode_run_shows_a_due_certificate_and_the_store_keeps_the_one_served(tmp_path):
    """`provision --check`, `apply --dry-run`: the roles see a new certificate (and report the change), while the
    machine's directory keeps the pair its engine still serves."""
    store = Store(tmp_path / "home")
    web1 = _machine(store, "web1")
    web1.engine = {"registry_enabled": True}
    _tls_material(store, web1, _Driver(), renew=False)
    ca = certs.Pair(store.certs_dir / "ca.pem", store.certs_dir / "ca-key.pem")
    served = ending_in(certs.server_pair(web1.dir), ca, 20)
    before = {path: path.read_bytes() for path in web1.dir.glob("*.pem")}
    _, pems = _tls_material(store, web1, _Driver(), renew=False, check=True)
    assert pems["engine"][0].encode() != served and "-----BEGIN CERTIFICATE-----" in pems["engine"][0]
    assert pems["registry"] == certs.registry_pair(web1.dir).pem()  # not due: the one it serves
    assert {path: path.read_bytes() for path in web1.dir.glob("*.pem")} == before


def test_regenerate_certs_client_certs_reissues_the_client_certificate_once(tmp_path, monkeypatch, capsys):
    from machine.cli import main
    from machine.store import Store

    monkeypatch.setenv("PYMACHINE_HOME", str(tmp_path / "home"))
    store = Store()
    _, client = certs.ensure_ca(store.certs())
    before = client.cert.read_bytes()
    monkeypatch.setattr("sys.argv", ["pymachine", "regenerate-certs", "--client-certs", "ghost"])
    with pytest.raises(SystemExit) as exit_code:
        main()
    assert exit_code.value.code == 1 and "no machine named 'ghost'" in capsys.readouterr().err
    assert client.cert.read_bytes() != before  # reissued first, by the same CA
    assert not certs.expiring(client.cert)


def _end(path) -> datetime.datetime:
    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc


def test_a_ca_with_less_than_a_certificates_lifetime_left_is_renewed_and_what_it_issued_stays_valid(tmp_path):
    """A CA 100 days from its end would issue certificates that outlive it, and after it ends every engine and
    client fails with no command to mend it: the first provisioning renews it, with the same key and name."""
    store = Store(tmp_path / "home")
    web1, web2 = _machine(store, "web1"), _machine(store, "web2")
    for machine in (web1, web2):
        _tls_material(store, machine, _Driver(), renew=False)
    ca = certs.Pair(store.certs_dir / "ca.pem", store.certs_dir / "ca-key.pem")
    client = certs.Pair(store.certs_dir / "cert.pem", store.certs_dir / "key.pem")
    server = certs.server_pair(web1.dir)
    old_ca = ending_in(ca, ca, 100)
    for machine in (web1, web2):
        (machine.dir / "ca.pem").write_bytes(old_ca)  # each machine's copy, as the CA was
    old_ca_file = tmp_path / "old-ca.pem"
    old_ca_file.write_bytes(old_ca)

    _tls_material(store, web1, _Driver(), renew=False)
    assert ca.cert.read_bytes() != old_ca and not certs.expiring(ca.cert, certs.CA_RENEW_DAYS)
    before, after = (x509.load_pem_x509_certificate(pem) for pem in (old_ca, ca.cert.read_bytes()))
    assert after.subject == before.subject and after.public_key() == before.public_key()
    for machine in (web1, web2):  # web2's copy follows without its own provisioning
        assert (machine.dir / "ca.pem").read_bytes() == ca.cert.read_bytes()
    # What the CA issued before stays valid under the renewed certificate, and an engine that still holds the old
    # one (until its next provisioning) keeps accepting the client.
    assert server.cert.read_bytes() == certs.server_pair(web1.dir).cert.read_bytes()
    assert _handshake(ca, server, client) == (True, ["accepted"])
    assert _handshake(certs.Pair(old_ca_file, ca.key), server, client) == (True, ["accepted"])
    # What it issues from now on ends before it does.
    _tls_material(store, web1, _Driver(), renew=True)
    assert _end(server.cert) < _end(ca.cert) and _end(client.cert) < _end(ca.cert)
    assert _handshake(ca, server, client) == (True, ["accepted"])
