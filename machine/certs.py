"""The TLS material of mutual authentication: one CA and client certificate per store, a server
certificate per machine whose SANs name every address the engine is reached at.

cryptography is imported by the functions that make certificates: `env` (a quick command) only reads the names a
server certificate carries, and a provisioning when each certificate ends, both kept beside it when it is issued."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from machine.endpoint import normal_host
from machine.store import file_lock, write_atomic

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

_CA_DAYS, _LEAF_DAYS = 3650, 1095
# A leaf certificate (the client's, an engine's) this close to its end is reissued when pymachine next makes
# certificates (a provisioning): a user who provisions monthly never sees one expire.
RENEW_DAYS = 30
# The CA's certificate is renewed once it has less than a leaf's lifetime left, so that no leaf outlives the CA
# that issued it; with the same key and name, so that every certificate issued before stays valid under the new
# one. The machines' copies follow at once, each engine's at its next provisioning (which every leaf it holds,
# ending before the old CA certificate, needs first).
CA_RENEW_DAYS = _LEAF_DAYS


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
    # Kept beside it, as its names are: a provisioning checks every certificate's end without cryptography.
    write_atomic(_beside(pair.cert, "expires"), str(cert.not_valid_after_utc.timestamp()).encode(), 0o644)
    return pair


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    import datetime

    from cryptography import x509

    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def ensure_ca(certs_dir: Path, renew_client: bool = False,
              reissued: Callable[[Pair, Pair, bytes], None] = lambda ca, client, shared: None) -> tuple[Pair, Pair]:
    """The store's CA and client certificate, made once (under a lock) and shared by all machines. The CA's
    certificate is renewed (same key) when it has less than CA_RENEW_DAYS left. The client certificate is reissued
    (by the same CA: every engine keeps trusting it) when it has expired or is about to, and with `renew_client`.
    When either changed, `reissued(ca, client, shared)` is called, still under the lock; `shared` is the CA
    certificate as the machines of this CA still hold it."""
    ca = Pair(certs_dir / "ca.pem", certs_dir / "ca-key.pem")
    client = Pair(certs_dir / "cert.pem", certs_dir / "key.pem")
    with file_lock(certs_dir / ".lock", timeout=60, what="the certificate store"):
        shared = ca.cert.read_bytes() if ca.cert.exists() else None
        if shared is None:
            _make_ca(ca)
            client.cert.unlink(missing_ok=True)  # a client cert of an older CA is useless
        elif expiring(ca.cert, CA_RENEW_DAYS):
            _renew_ca(ca)
        changed = ca.cert.read_bytes() != shared
        if renew_client or not client.cert.exists() or expiring(client.cert):
            from cryptography.x509.oid import ExtendedKeyUsageOID

            _issue(ca, client, "pymachine client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
            changed = True
        if changed:
            reissued(ca, client, shared or ca.cert.read_bytes())
    return ca, client


def _renew_ca(ca: Pair) -> None:
    from cryptography.hazmat.primitives import serialization

    old = _load(ca.cert)
    _make_ca(ca, serialization.load_pem_private_key(ca.key.read_bytes(), password=None), old.subject)


def _make_ca(ca: Pair, key: ec.EllipticCurvePrivateKey | None = None, name: x509.Name | None = None) -> None:
    """A new self-signed CA certificate: of a new key, or (a renewal) of the CA's own key and name."""
    # cryptography is imported where a certificate is made: it costs ~40 ms, and every command using a machine
    # that exists only reads the files.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = key or ec.generate_private_key(ec.SECP256R1())
    name = name or _name("pymachine CA")
    cert = (_builder(name, name, key.public_key(), _CA_DAYS)
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
    write_atomic(_beside(target.cert, "names"), json.dumps(sorted({normal_host(n) for n in names if n})).encode(),
                 0o644)
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


def _beside(cert_path: Path, what: str) -> Path:
    return cert_path.with_name(f"{cert_path.name}.{what}")


def _kept(cert_path: Path, what: str, work_out: Callable[[], str]) -> str:
    """What is kept beside the certificate (its names, its end): written when pymachine issues it; for any other
    (one copied over it, or issued before this was kept), worked out once from the certificate and kept then, so
    that a provisioning's checks need no cryptography."""
    kept = _beside(cert_path, what)
    if kept.exists() and kept.stat().st_mtime_ns >= cert_path.stat().st_mtime_ns:
        return kept.read_text()
    value = work_out()
    write_atomic(kept, value.encode(), 0o644)
    return value


def _load(cert_path: Path) -> x509.Certificate:
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert_path.read_bytes())


def expiring(cert_path: Path, days: int = RENEW_DAYS) -> bool:
    """Whether the certificate has expired, or will within `days`."""
    end = float(_kept(cert_path, "expires", lambda: str(_load(cert_path).not_valid_after_utc.timestamp())))
    return end - time.time() < days * 86400


def sans_of(cert_path: Path) -> set[str]:
    """The names a certificate is valid for (to tell whether it must be regenerated)."""
    return set(json.loads(_kept(cert_path, "names", lambda: json.dumps(sorted(_read_sans(cert_path))))))


def _read_sans(cert_path: Path) -> set[str]:
    from cryptography import x509

    try:
        ext = _load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in ext.get_values_for_type(x509.IPAddress)} | set(ext.get_values_for_type(x509.DNSName))


def carries(cert_path: Path, names: Iterable[str]) -> bool:
    """Whether the certificate is valid for every one of `names` (an IP address in any of its spellings: the
    user's `2001:DB8::5` is the certificate's `2001:db8::5`)."""
    return {normal_host(n) for n in names} <= sans_of(cert_path)
