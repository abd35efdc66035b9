"""A Gutenberg mirror over real HTTP on 127.0.0.1 that can misbehave on purpose.

It serves the shared test mirror like `python -m http.server`, logs every request (path,
User-Agent, time) and plays scripted faults per path: error statuses (with Retry-After for
429), a response slower than the client's timeout, or a replacement body.
"""

from __future__ import annotations

import functools
import http.server
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SLOW = "slow"  # a fault: answer only after `slow_s`, later than the client's timeout


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
        try:
            time.sleep(mirror.latency_s)
            self._answer(mirror)
        finally:
            with mirror._lock:
                mirror._in_flight -= 1

    def _answer(self, mirror: FaultyMirror) -> None:
        fault = mirror._next_fault(self.path)
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
