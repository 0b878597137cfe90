"""Fetch an image (URL or local path) into the cache once, verified against its sha256 while it streams."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from machine import ui
from machine.errors import MachineError, UsageError
from machine.store import file_lock

_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_source(source: str, sha256: str | None) -> None:
    """Validate an image source and checksum up front (no I/O beyond a local stat)."""
    if sha256 is not None and not _SHA256.fullmatch(sha256.lower()):
        raise UsageError(f"{sha256!r} is not a sha256 (64 hex digits)")
    scheme = urlparse(source).scheme
    if scheme in ("http", "https", "file"):
        return
    if scheme:
        raise UsageError(f"image {source!r}: unsupported URL scheme {scheme!r}")
    if not Path(source).is_file():
        raise UsageError(f"image {source!r} is not a file or an http(s) URL")


def _open(source: str):
    parsed = urlparse(source)
    if parsed.scheme in ("http", "https", "file"):
        import urllib.error  # late (with http.client, ssl, email: ~20 ms): drivers import this module
        import urllib.request

        try:
            response = urllib.request.urlopen(source, timeout=30)  # scheme checked above
        except (urllib.error.URLError, OSError) as e:
            raise MachineError(f"cannot download {source}: {getattr(e, 'reason', e)}") from None
        return response, int(response.headers.get("Content-Length") or 0)
    try:
        stream = Path(source).open("rb")  # noqa: SIM115 - fetch closes it (`with stream`)
    except OSError as e:
        raise MachineError(f"cannot read {source}: {e.strerror}") from None
    return stream, os.fstat(stream.fileno()).st_size


def fetch(source: str, cache_dir: Path, sha256: str | None = None) -> Path:
    """Return the cached file for `source`, downloading it once; a checksum mismatch, a full disk or any other
    failure caches nothing (not even a partial file)."""
    try:
        return _fetch(source, cache_dir, sha256)
    except OSError as e:  # the cache's side: reading the source fails as a MachineError of its own
        detail = e.strerror or str(e)
        raise MachineError(f"cannot store {source} in the image cache {cache_dir}: {detail} "
                           f"(PYMACHINE_CACHE chooses another directory)") from None


def _fetch(source: str, cache_dir: Path, sha256: str | None) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    if sha256:
        cached = cache_dir / sha256.lower()
        if cached.is_file():
            return cached
    with file_lock(cache_dir / ".lock", timeout=3600, what=f"image cache {cache_dir}"):
        if sha256 and (cache_dir / sha256.lower()).is_file():
            return cache_dir / sha256.lower()  # another process fetched it while we waited
        stream, size = _open(source)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".download.")
        try:
            with stream, os.fdopen(fd, "wb") as out, _progress(source, size) as advance:
                actual = _copy(source, stream, out, advance)
            if sha256 and actual != sha256.lower():
                raise MachineError(f"checksum mismatch for {source}: expected {sha256.lower()}, got {actual}")
            target = cache_dir / actual
            os.replace(tmp, target)
            return target
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _copy(source: str, stream: BinaryIO, out: BinaryIO, advance: Callable[[int], None]) -> str:
    """Copy `stream` to `out` (flushed to disk); return the sha256 of what was copied."""
    digest = hashlib.sha256()
    while chunk := _read(source, stream):
        digest.update(chunk)
        out.write(chunk)
        advance(len(chunk))
    out.flush()
    os.fsync(out.fileno())
    return digest.hexdigest()


def _read(source: str, stream: BinaryIO) -> bytes:
    """The next chunk of the source; a connection that breaks (or ends short of its length) fails the download."""
    import http.client  # already imported by urllib.request when the source is a URL

    try:
        return stream.read(1 << 20)
    except (OSError, http.client.HTTPException) as e:
        detail = (e.strerror or e) if isinstance(e, OSError) else repr(e)
        raise MachineError(f"cannot read {source}: {detail}") from None


@contextlib.contextmanager
def _progress(source: str, size: int) -> Iterator[Callable[[int], None]]:
    """Report a download: its size when it starts, how far it has got and how fast (ui.long_step: live on a
    terminal, every few seconds in a log), and its size, time and mean rate when it ends."""
    name = Path(urlparse(source).path).name
    with ui.long_step(f"downloading {name}" + (f" ({ui.size(size)})" if size else "")) as step:
        got = 0

        def advance(n: int) -> None:
            nonlocal got
            got += n
            rate = _rate(got, step.elapsed())
            step.report(f"{got * 100 // size}% ({ui.size(got)}, {rate})" if size else f"{ui.size(got)} ({rate})")

        yield advance
        elapsed = step.elapsed()
        step.done(f"downloaded {name}: {ui.size(got)} in {ui.duration(elapsed)} ({_rate(got, elapsed)})")


def _rate(got: int, seconds: float) -> str:
    """The mean rate of a download so far: `22.9 MiB/s`."""
    return f"{ui.size(got / max(seconds, 1e-3))}/s"
