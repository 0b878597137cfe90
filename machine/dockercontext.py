"""A `docker context` per machine for users who prefer contexts to `pymachine env`.

Only contexts pymachine made (recognised by their description) are ever replaced or removed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

_DESCRIPTION = "pymachine machine"


def _docker(*args: str) -> subprocess.CompletedProcess[str] | None:
    client = shutil.which("docker")
    if client is None:
        return None
    return subprocess.run([client, "context", *args], capture_output=True, text=True)


def _ours(name: str) -> bool | None:
    """True if pymachine made context `name`, False if someone else did, None if there is none."""
    proc = _docker("inspect", name)
    if proc is None or proc.returncode != 0:
        return None
    # Not --format: the CLI cannot template fields of context metadata.
    return json.loads(proc.stdout)[0].get("Metadata", {}).get("Description") == _DESCRIPTION


def save(name: str, url: str, cert_dir: Path) -> bool:
    """Create or update the machine's context; False when the docker CLI is missing or the name is taken."""
    owned = _ours(name)
    if owned is False:
        return False
    if owned:
        _docker("rm", "-f", name)
    endpoint = f"host={url},ca={cert_dir / 'ca.pem'},cert={cert_dir / 'cert.pem'},key={cert_dir / 'key.pem'}"
    proc = _docker("create", name, "--description", _DESCRIPTION, "--docker", endpoint)
    return proc is not None and proc.returncode == 0


def remove(name: str) -> None:
    if _ours(name):
        _docker("rm", "-f", name)
