"""The TLS material of mutual authentication: one CA and client certificate per store, a server
certificate per machine whose SANs name every address the engine is reached at.

cryptography is imported by the functions that make certificates: `env` (a quick command) only reads the names a
server certificate carries, which are kept beside it when it is issued."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from machine.store import file_lock, write_atomic

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

_CA_DAYS, _LEAF_DAYS = 3650, 1095


class Pair(NamedTuple):
    cert: Path
    key: Path

    def pem(self) -> tuple[str, str]:
        return self.cert.read_text(), self.key.read_text()


def server_pair(machine_dir: Path) -> Pair:
    """The engine's certificate and key, in the machine's directory (DOCKER_CERT_PATH)."""
    return Pair(machine_dir / "server.pem", machine_dir / "server-key.pem")


def registry_pair(machine_dir: Path) -> Pair:
    return Pair(machine_dir / "registry.pem", machine_dir / "registry-key.pem")


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pymachine"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(pair: Pair, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
    from cryptography.hazmat.primitives import serialization

    write_atomic(pair.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), 0o600)
    write_atomic(pair.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return pair


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    import datetime

    from cryptography import x509

    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def ensure_ca(certs_dir: Path) -> tuple[Pair, Pair]:
    """The store's CA and client certificate, made once (under a lock) and shared by all machines."""
    ca = Pair(certs_dir / "ca.pem", certs_dir / "ca-key.pem")
    client = Pair(certs_dir / "cert.pem", certs_dir / "key.pem")
    with file_lock(certs_dir / ".lock", timeout=60, what="the certificate store"):
        if not ca.cert.exists():
            _make_ca(ca)
            client.cert.unlink(missing_ok=True)  # a client cert of an older CA is useless
        if not client.cert.exists():
            from cryptography.x509.oid import ExtendedKeyUsageOID

            _issue(ca, client, "pymachine client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return ca, client


def _make_ca(ca: Pair) -> None:
    # cryptography is imported where a certificate is made: it costs ~40 ms, and every command using a machine
    # that exists only reads the files.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(_name("pymachine CA"), _name("pymachine CA"), key.public_key(), _CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(ca, cert, key)


def issue_server(ca: Pair, target: Pair, hostname: str, sans: Iterable[str]) -> Pair:
    """A server certificate for the engine; `sans` are IPs or DNS names (localhost is always added). Its names are
    kept beside it, for sans_of."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    names = [hostname, "localhost", "127.0.0.1", *sans]
    _issue(ca, target, hostname, ExtendedKeyUsageOID.SERVER_AUTH, names)
    write_atomic(_names_file(target.cert), json.dumps(sorted({_normal(n) for n in names if n})).encode(), 0o644)
    return target


def _issue(ca: Pair, target: Pair, common_name: str, usage, names: Iterable[str]) -> Pair:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(_name(common_name), ca_cert.subject, key.public_key(), _LEAF_DAYS)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(_general_names(names)), critical=False)
    return _write(target, builder.sign(ca_key, hashes.SHA256()), key)


def _general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    from cryptography import x509

    seen, result = set(), []
    for name in names:
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            result.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            result.append(x509.DNSName(name))
    return result


def _normal(name: str) -> str:
    """An address as the certificate gives it back (`fe80::0001` is `fe80::1`), a DNS name as it is."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _names_file(cert_path: Path) -> Path:
    return cert_path.with_name(cert_path.name + ".names")


def sans_of(cert_path: Path) -> set[str]:
    """The names a certificate is valid for (to tell whether it must be regenerated): as kept when it was issued,
    or read from the certificate (one pymachine did not issue, or issued before the names were kept)."""
    kept = _names_file(cert_path)
    if kept.exists() and kept.stat().st_mtime_ns >= cert_path.stat().st_mtime_ns:
        return set(json.loads(kept.read_text()))
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(ext.get_values_for_type(x509.DNSName))
