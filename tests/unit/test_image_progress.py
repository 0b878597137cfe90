"""Outside a terminal, a download and a base-image build print plain lines: when they start (a download's size),
how far they have got every ui.PROGRESS_INTERVAL seconds (a download's rate), and when they are done."""

from __future__ import annotations

import hashlib
import http.server
import re
import sys
import time
from collections.abc import Iterator

import pytest

from machine import images, ui
from machine.drivers.local import rootfs
from machine.errors import MachineError
from tests.conftest import http_on_loopback

CHUNK = 1 << 20  # images reads the source a MiB at a time
CHUNKS = 6
PAUSE = 0.15  # between the chunks the server sends: the download takes about a second
INTERVAL = 0.3  # ui.PROGRESS_INTERVAL for these tests (5 s in use)


@pytest.fixture
def interval(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(ui, "PROGRESS_INTERVAL", INTERVAL)
    return INTERVAL


@pytest.fixture
def slow_server() -> Iterator[str]:
    """An HTTP server on 127.0.0.1 sending CHUNKS MiB slowly: /sized.img with a Content-Length, /unsized.img
    without one (the body ends when the connection closes)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            if self.path == "/sized.img":
                self.send_header("Content-Length", str(CHUNK * CHUNKS))
            self.end_headers()
            for _ in range(CHUNKS):
                self.wfile.write(b"x" * CHUNK)
                self.wfile.flush()
                time.sleep(PAUSE)

    with http_on_loopback(Handler) as url:
        yield url


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    assert captured.err == ""  # stderr carries only errors
    return captured.out.splitlines()


def _assert_paced(lines: list[str], elapsed: float) -> None:
    """Some progress lines, and never more than one per interval."""
    assert 1 <= len(lines) <= elapsed / INTERVAL + 1, lines


@pytest.mark.parametrize(("path", "size"), [("sized.img", " (6.0 MiB)"), ("unsized.img", "")])
def test_download_prints_size_progress_and_rate(slow_server, interval, tmp_path, capsys, path, size):
    started = time.monotonic()
    with ui.showing(ui.PlainBoard("ready").line("web1")):
        cached = images.fetch(f"{slow_server}/{path}", tmp_path / "cache")
    elapsed = time.monotonic() - started
    assert cached.name == hashlib.sha256(b"x" * CHUNK * CHUNKS).hexdigest()

    first, *progress, last = _lines(capsys)
    assert first == f"web1: downloading {path}{size}"
    done = re.fullmatch(rf"web1: downloaded {path}: 6\.0 MiB in (\d+\.\d) s \((\d+\.\d) MiB/s\)", last)
    assert done, last
    assert float(done[1]) >= PAUSE * (CHUNKS - 1) and float(done[2]) <= 6 / (PAUSE * (CHUNKS - 1))
    how_far = r"(\d+)% \((\d+\.\d) MiB, " if size else r"()(\d+\.\d) MiB \("
    pattern = re.compile(rf"web1: downloading {path}{re.escape(size)}: {how_far}\d+\.\d (KiB|MiB)/s\)")
    matches = [pattern.fullmatch(line) for line in progress]
    assert all(matches), progress
    _assert_paced(progress, elapsed)
    got = [float(m[2]) for m in matches]
    assert got == sorted(got) and all(0 < n <= 6 for n in got)
    assert not size or [int(m[1]) for m in matches] == [int(n * 100 // 6) for n in got]


def test_build_prints_its_steps_paced(interval, capsys):
    """The base-image build as the local driver runs debootstrap: its `I:` lines, paced; the last one too when
    nothing follows it for a while (debootstrap is quiet for a minute while it unpacks the base system); a line
    when it is done."""
    script = ("import time\n"
              "for i in range(8):\n"
              "    print(f'I: Retrieving package{i}', flush=True)\n"
              "    print('noise from wget', flush=True)\n"
              "    time.sleep(0.1)\n"
              "print('I: Unpacking the base system...', flush=True)\n"
              f"time.sleep({3 * INTERVAL})\n")
    started = time.monotonic()
    with ui.showing(ui.PlainBoard("ready").line("web1")), ui.long_step("building the base image") as step:
        rootfs._run([sys.executable, "-c", script], report=step.report)
    elapsed = time.monotonic() - started

    first, *progress, last = _lines(capsys)
    assert first == "web1: building the base image"
    assert all(re.fullmatch(r"web1: building the base image: Retrieving package[0-7]", line)
               for line in progress[:-1]), progress
    assert progress[-1] == "web1: building the base image: Unpacking the base system..."
    _assert_paced(progress, elapsed)
    assert re.fullmatch(r"web1: building the base image: done in \d+\.\d s", last)


def test_a_failure_ends_the_line_before_held_back_progress(interval, capsys):
    board = ui.PlainBoard("ready")
    line = board.line("web1")
    line.update("building")
    line.progress("building: Retrieving libc6")  # within the interval: held back
    board.finish("web1", "debootstrap failed")
    time.sleep(2 * INTERVAL)
    assert _lines(capsys) == ["web1: building", "web1: failed: debootstrap failed"]


def test_failed_build_names_its_last_line(interval, capsys):
    script = "print('I: Retrieving libc6'); print(\"E: Couldn't download libc6\"); raise SystemExit(1)"
    reported: list[str] = []
    with pytest.raises(MachineError, match=r"failed \(exit 1\): E: Couldn't download libc6$"):
        rootfs._run([sys.executable, "-c", script], report=reported.append)
    assert reported == ["Retrieving libc6"]


def test_durations_read_as_a_person_reads_them():
    assert [ui.duration(s) for s in (4.24, 59.9, 133, 3600)] == ["4.2 s", "59.9 s", "2m13s", "60m00s"]
