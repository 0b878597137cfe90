"""Ed25519 key pairs in OpenSSH formats: the user's key for a machine, and a host key to pin in advance.

cryptography is imported by the functions that use it: every driver imports this module, and the quick commands
(ip, env, ls) that load a driver must not pay for it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyPair:
    private_openssh: bytes
    public_line: str  # "ssh-ed25519 AAAA… comment"


def new_keypair(comment: str = "") -> KeyPair:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = public.decode() + (f" {comment}" if comment else "")
    return KeyPair(private, line)


def public_line(private_openssh: bytes, comment: str = "") -> str:
    """The authorized_keys line of an existing OpenSSH private key."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private_openssh, password=None)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode() + (f" {comment}" if comment else "")
