import io

import paramiko

from machine import sshkeys


def test_generated_keys_load_in_paramiko_and_match_their_public_line():
    pair = sshkeys.new_keypair("me@host")
    key = paramiko.Ed25519Key.from_private_key(io.StringIO(pair.private_openssh.decode()))
    kind, b64, comment = pair.public_line.split()
    assert (kind, b64, comment) == ("ssh-ed25519", key.get_base64(), "me@host")
    assert sshkeys.public_line(pair.private_openssh) == f"{kind} {b64}"
