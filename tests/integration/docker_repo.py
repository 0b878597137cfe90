"""A stand-in for Docker's apt repository (download.docker.com cannot be reached here), built for a test.

Docker's layout (`linux/debian/gpg`, `linux/debian/dists/<release>/stable/…`, signed with a key made for the
test) holding the packages the engine role installs from it, by Docker's names: `docker-ce` is Debian's
`docker.io` (which conflicts with Docker's packages by name) renamed, from the archive the host's apt knows;
`docker-ce-cli`, `containerd.io` and `docker-buildx-plugin` are empty. Serve the directory and pass
`<url>/linux` as --engine-install-url.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
from pathlib import Path

VERSION = "5:99.0.0-1~pmtest"
EMPTY = ("docker-ce-cli", "containerd.io", "docker-buildx-plugin")


def build(root: Path, release: str = "bookworm") -> Path:
    """The repository under `root` (served as its document root); returns `root`."""
    repo = root / "linux/debian"
    pool = repo / "pool/stable"
    pool.mkdir(parents=True)
    trees = root / "trees"
    trees.mkdir()
    entries = [_engine(trees, pool, repo)] + [_package(trees / name, pool, repo, _control(name)) for name in EMPTY]
    index = repo / f"dists/{release}/stable/binary-amd64"
    index.mkdir(parents=True)
    text = "\n".join(entries).encode()
    (index / "Packages").write_bytes(text)
    (index / "Packages.gz").write_bytes(gzip.compress(text))
    files = [index / "Packages", index / "Packages.gz"]
    dist = repo / f"dists/{release}"
    sums = "".join(f" {hashlib.sha256(f.read_bytes()).hexdigest()} {f.stat().st_size} {f.relative_to(dist)}\n"
                   for f in files)
    (dist / "Release").write_text(f"Origin: pymachine test\nLabel: Docker CE (stand-in)\nSuite: {release}\n"
                                  f"Codename: {release}\nArchitectures: amd64\nComponents: stable\n"
                                  f"Date: Tue, 01 Dec 2026 00:00:00 UTC\nSHA256:\n{sums}")
    _sign(root / "gnupg", dist, repo / "gpg")
    return root


def _control(name: str, arch: str = "all", rest: str = "") -> str:
    return (f"Package: {name}\nVersion: {VERSION}\nArchitecture: {arch}\n"
            f"Maintainer: pymachine tests <t@example.invalid>\n{rest}Description: stand-in for Docker's {name}\n")


def _engine(trees: Path, pool: Path, repo: Path) -> str:
    """docker-ce: Debian's docker.io (downloaded by the host's apt) under Docker's name, without its conflict with
    Docker's packages."""
    subprocess.run(["apt-get", "download", "-q", "docker.io"], cwd=trees, check=True, capture_output=True)
    [deb] = trees.glob("docker.io_*.deb")
    tree = trees / "docker-ce"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True, capture_output=True)
    fields = (tree / "DEBIAN/control").read_text().split("\nDescription:")[0].splitlines()
    kept = "".join(f"{line}\n" for line in fields if line.startswith(("Depends:", "Recommends:", "Suggests:")))
    return _package(tree, pool, repo, _control("docker-ce", _fields(fields)["Architecture"], kept))


def _fields(lines: list[str]) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in lines if ": " in line and not line.startswith(" "))


def _package(tree: Path, pool: Path, repo: Path, control: str) -> str:
    """The .deb of `tree` with `control` in the pool; its entry in the Packages index."""
    (tree / "DEBIAN").mkdir(parents=True, exist_ok=True)
    (tree / "DEBIAN/control").write_text(control)
    fields = _fields(control.splitlines())
    deb = pool / f"{fields['Package']}_{VERSION.split(':')[1]}_{fields['Architecture']}.deb"
    # Uncompressed: the engine is tens of MiB, served on loopback.
    subprocess.run(["dpkg-deb", "-Znone", "--root-owner-group", "-b", str(tree), str(deb)], check=True,
                   capture_output=True)
    data = deb.read_bytes()
    return (control + f"Filename: {deb.relative_to(repo)}\nSize: {len(data)}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n")


def _sign(home: Path, dist: Path, public_key: Path) -> None:
    """InRelease, clear-signed with a key made for this repository; its public half at `public_key`."""
    home.mkdir(mode=0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    gpg = ["gpg", "--batch", "--quiet", "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", "pymachine test repository", "ed25519", "sign", "never"], env=env,
                   check=True, capture_output=True)
    subprocess.run([*gpg, "--armor", "--output", str(public_key), "--export"], env=env, check=True,
                   capture_output=True)
    subprocess.run([*gpg, "--clearsign", "--output", str(dist / "InRelease"), str(dist / "Release")], env=env,
                   check=True, capture_output=True)
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True)  # started for the signing
