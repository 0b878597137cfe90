"""A `docker context` per machine for users who prefer contexts to `pymachine env`.

Only the machine's own context is ever replaced or removed: its description names the machine's directory, so
neither a context the user made nor one of a machine of the same name in another store (a molecule scenario's,
another PYMACHINE_HOME's) is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

_DESCRIPTION = "pymachine machine"  # then the machine's directory; alone, as contexts were made before it was


def _docker(*args: str) -> subprocess.CompletedProcess[str] | None:
    client = shutil.which("docker")
    if client is None:
        return None
    return subprocess.run([client, "context", *args], capture_output=True, text=True)


def _inspect(name: str) -> dict | None:
    """The docker CLI's record of context `name`; None if there is none (or no docker CLI)."""
    proc = _docker("inspect", name)
    if proc is None or proc.returncode != 0:
        return None
    return json.loads(proc.stdout)[0]


def _stored(name: str) -> dict | None:
    """The record as the CLI stores it (`Storage` in its inspect output), read without running it: every
    provisioning ends by checking the context, and the CLI's start costs ~25 ms. None if it is not found there,
    and the CLI is asked."""
    store = Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker") / "contexts"
    digest = hashlib.sha256(name.encode()).hexdigest()
    try:
        record = json.loads((store / "meta" / digest / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return {**record, "Storage": {"TLSPath": str(store / "tls" / digest)}} if isinstance(record, dict) else None


def _ours(context: dict, cert_dir: Path) -> bool:
    # Not --format: the CLI cannot template fields of context metadata.
    description = context.get("Metadata", {}).get("Description")
    if description == _DESCRIPTION:  # made before descriptions named the machine: its store's CA tells
        return _kept_equal(context, cert_dir, ("ca.pem",))
    return description == f"{_DESCRIPTION} {cert_dir}"


def _kept_equal(context: dict, cert_dir: Path, files: tuple[str, ...]) -> bool:
    """Whether the context keeps the same `files` as the machine directory `cert_dir`."""
    kept = Path(context.get("Storage", {}).get("TLSPath", "/nonexistent"), "docker")
    try:
        return all((kept / f).read_bytes() == (cert_dir / f).read_bytes() for f in files)
    except OSError:
        return False


def _up_to_date(context: dict, url: str, cert_dir: Path) -> bool:
    """Whether the context already reaches `url` with the machine's certificates (nothing to write)."""
    return (context.get("Endpoints", {}).get("docker", {}).get("Host") == url
            and context.get("Metadata", {}).get("Description") == f"{_DESCRIPTION} {cert_dir}"
            and _kept_equal(context, cert_dir, ("ca.pem", "cert.pem", "key.pem")))


def save(name: str, url: str, cert_dir: Path) -> bool:
    """Create or update the machine's context; False when the docker CLI is missing or the name is taken."""
    stored = _stored(name)
    if stored is not None and _up_to_date(stored, url, cert_dir):
        return True
    context = _inspect(name)
    if context is not None:
        if not _ours(context, cert_dir):
            return False
        _docker("rm", "-f", name)
    endpoint = f"host={url},ca={cert_dir / 'ca.pem'},cert={cert_dir / 'cert.pem'},key={cert_dir / 'key.pem'}"
    proc = _docker("create", name, "--description", f"{_DESCRIPTION} {cert_dir}", "--docker", endpoint)
    return proc is not None and proc.returncode == 0


def refresh(name: str, cert_dir: Path) -> None:
    """Give the machine's own context, if it has one, the certificates now in `cert_dir` (the store's client
    certificate was reissued); it keeps its engine address."""
    context = _stored(name) or _inspect(name)
    url = (context or {}).get("Endpoints", {}).get("docker", {}).get("Host")
    if context is not None and url and _ours(context, cert_dir):
        save(name, url, cert_dir)


def remove(name: str, cert_dir: Path) -> None:
    """Remove the context of the machine whose directory is `cert_dir`, if it has one."""
    context = _inspect(name)
    if context is not None and _ours(context, cert_dir):
        _docker("rm", "-f", name)
