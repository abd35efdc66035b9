"""Gutenberg mirrors for the download tests: over real HTTP and a real rsync daemon on 127.0.0.1.

FaultyMirror serves the shared test mirror like `python -m http.server`, logs every request
(path, User-Agent, time) and plays scripted faults per path: error statuses (with
Retry-After for 429), a response slower than the client's timeout, or a replacement body.
RsyncDaemon serves folders as rsync modules and logs every file it sends.
"""

from __future__ import annotations

import csv
import functools
import io
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import free_port, stop_pid, wait_for_port
from gptrain.cli import main

SLOW = "slow"  # a fault: answer only after `slow_s`, later than the client's timeout
ENGLISH_ON_MIRROR = {3, 7, 11, 35, 41, 43, 46, 74, 98, 132, 219, 1080, 1184, 1661, 2600, 2701, 9198,
                     11563, 16119, 26060, 26184}
MISSING_ON_MIRROR = {1, 16, 36}  # English texts in the catalog whose files are absent on purpose
ENGLISH_TEXTS = ENGLISH_ON_MIRROR | MISSING_ON_MIRROR


@pytest.fixture(autouse=True)
def no_array_env(monkeypatch):
    """The suite may itself run inside a Slurm array or Indexed Job: start from a single task."""
    for name in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT",
                 "JOB_COMPLETION_INDEX", "GPTRAIN_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)


def run_cli(*argv: str) -> int:
    """`gptrain data download ARGV` through the console script's entry point."""
    return main(["data", "download", *argv])


def report(raw: Path, index: int = 0, count: int = 1) -> dict:
    return json.loads((raw / "reports" / f"download-{index}-of-{count}.json").read_text())


def ids(entries: list[dict]) -> set[int]:
    return {entry["book_id"] for entry in entries}


def books_on_disk(raw: Path) -> set[int]:
    return {int(p.name[2:-4]) for p in (raw / "books").glob("pg*.txt")}


def mirror_book(mirror_dir: Path, book_id: int) -> bytes:
    return (mirror_dir / "cache" / "epub" / str(book_id) / f"pg{book_id}.txt").read_bytes()


@dataclass(frozen=True)
class Request:
    path: str
    user_agent: str
    time: float


class FaultyMirror:
    def __init__(self, directory: Path, slow_s: float = 2.5, latency_s: float = 0.0):
        self.directory = directory
        self.slow_s = slow_s
        self.latency_s = latency_s  # added to every answer, so that requests overlap
        self.requests: list[Request] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._faults: dict[str, list[int | str]] = {}
        self._always: dict[str, int] = {}
        self._bodies: dict[str, bytes] = {}
        self._lock = threading.Lock()
        handler = functools.partial(_Handler, self, directory=str(directory))
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"

    def fail(self, path: str, *faults: int | str) -> None:
        """Answer the next requests for `path` with these statuses (or SLOW), then normally."""
        self._faults[path] = list(faults)

    def fail_always(self, path: str, status: int) -> None:
        self._always[path] = status

    def serve_body(self, path: str, body: bytes) -> None:
        self._bodies[path] = body

    def paths(self) -> list[str]:
        with self._lock:
            return [r.path for r in self.requests]

    def book_requests(self) -> list[int]:
        """Book ids requested, in order, one entry per request (retries included)."""
        return [int(p.rsplit("/pg", 1)[1].removesuffix(".txt")) for p in self.paths() if p.endswith(".txt")]

    def times(self, path: str) -> list[float]:
        with self._lock:
            return [r.time for r in self.requests if r.path == path]

    def __enter__(self) -> "FaultyMirror":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _next_fault(self, path: str) -> int | str | None:
        with self._lock:
            if path in self._always:
                return self._always[path]
            queued = self._faults.get(path)
            return queued.pop(0) if queued else None


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client that timed out has closed its socket; writing the late answer fails. Expected.
        pass


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, mirror: FaultyMirror, *args, **kwargs):
        self.mirror = mirror
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        mirror = self.mirror
        with mirror._lock:
            mirror.requests.append(Request(self.path, self.headers.get("User-Agent", ""), time.monotonic()))
            mirror._in_flight += 1
            mirror.max_in_flight = max(mirror.max_in_flight, mirror._in_flight)
        time.sleep(mirror.latency_s)
        fault = mirror._next_fault(self.path)
        # A request is in flight, as its client sees it, from its arrival until its answer
        # starts: the client may read a whole answer and send its next request before this
        # thread has returned, and it gives up on a SLOW answer after its timeout to ask again.
        with mirror._lock:
            mirror._in_flight -= 1
        self._answer(mirror, fault)

    def _answer(self, mirror: FaultyMirror, fault: int | str | None) -> None:
        if fault == SLOW:
            time.sleep(mirror.slow_s)
        elif fault is not None:
            self.send_response(fault)
            if fault == 429:
                self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path in mirror._bodies:
            body = mirror._bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


class RsyncDaemon:
    """A real `rsync --daemon` on 127.0.0.1 serving modules {name: folder}, with transfer logging,
    so a test can tell which files each run sent."""

    def __init__(self, root: Path, modules: dict[str, Path]):
        self.root = root
        self.port = free_port()
        self.log = root / "rsyncd.log"
        lines = [f"pid file = {root / 'rsyncd.pid'}", "use chroot = no", f"uid = {os.getuid()}",
                 f"gid = {os.getgid()}", "transfer logging = yes", f"log file = {self.log}"]
        for name, path in modules.items():
            lines += [f"[{name}]", f"path = {path}", "read only = yes"]
        self.config = root / "rsyncd.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def url(self, module: str) -> str:
        return f"rsync://127.0.0.1:{self.port}/{module}"

    def sent(self) -> list[str]:
        """Paths sent so far, in order (one per file transferred)."""
        if not self.log.exists():
            return []
        return [line.split(") ", 1)[1].rsplit(" ", 1)[0] for line in self.log.read_text().splitlines() if " send " in line]

    def __enter__(self) -> "RsyncDaemon":
        rsync = shutil.which("rsync")
        if rsync is None:
            raise RuntimeError("rsync is not installed (scripts/system-deps.sh installs it)")
        self.proc = subprocess.Popen([rsync, "--daemon", "--no-detach", f"--config={self.config}",
                                      f"--port={self.port}", "--address=127.0.0.1"])
        wait_for_port(self.port)
        return self

    def __exit__(self, *exc) -> None:
        stop_pid(self.proc)


def collection_layout(mirror: Path, root: Path) -> dict[int, str]:
    """A module laid out like PG's collection (`1/2/3/12345/12345-0.txt`), from the shared
    mirror's books, offering each book some of the UTF-8, 8-bit and ASCII variants; returns
    {book id: the file a downloader must choose}. 1661 is in the catalog but not here."""
    def put(path: str, data: bytes) -> None:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)

    def book(book_id: int) -> bytes:
        return (mirror / "cache" / "epub" / str(book_id) / f"pg{book_id}.txt").read_bytes()

    alice = book(11)
    put("1/11/11-0.txt", alice)  # UTF-8 beats the others
    put("1/11/11-8.txt", alice.decode("utf-8-sig").encode("latin-1", "replace"))
    put("1/11/11.txt", alice.decode("utf-8-sig").encode("ascii", "replace"))
    time_machine = book(35).decode("utf-8-sig")
    put("3/35/35-8.txt", time_machine.encode("latin-1", "replace"))  # 8-bit beats ASCII
    put("3/35/35.txt", time_machine.encode("ascii", "replace"))
    put("4/41/41.txt", book(41).decode("utf-8-sig").encode("ascii", "replace"))  # the only one
    put("7/74/74-0.txt", book(74))
    put("0/7/7.txt", book(7))  # a one-digit id: folder 0
    return {11: "1/11/11-0.txt", 35: "3/35/35-8.txt", 41: "4/41/41.txt", 74: "7/74/74-0.txt", 7: "0/7/7.txt"}


def full_size_catalog(rows: int) -> tuple[bytes, list[dict]]:
    """A catalog like PG's at full size: its columns, quoted multi-line titles, lists of
    languages and subjects, Sound rows; returns its bytes and the rows' facts."""
    facts, out = [], io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Text#", "Type", "Issued", "Title", "Language", "Authors", "Subjects", "LoCC", "Bookshelves"])
    for book_id in range(1, rows + 1):
        fact = {
            "id": book_id,
            "type": "Sound" if book_id % 50 == 0 else "Text",
            "languages": "en; fr" if book_id % 11 == 0 else "fr" if book_id % 7 == 0 else "en",
            "subjects": "Science fiction; Adventure stories" if book_id % 13 == 0 else "Fiction; Love stories",
            "bookshelves": "Browsing: Poetry; Poetry" if book_id % 17 == 0 else "",
        }
        title = f"Book {book_id}\nOr, a subtitle, \"quoted\"" if book_id % 100 == 0 else f"Book {book_id}"
        writer.writerow([book_id, fact["type"], "2004-05-01", title, fact["languages"], "Writer, A., 1800-1870",
                         fact["subjects"], "PR", fact["bookshelves"]])
        facts.append(fact)
    return out.getvalue().encode(), facts
