"""A fault-injecting HTTP proxy in front of the test S3 server (moto_server).

Clients talk to the proxy as if it were the S3 endpoint (AWS_ENDPOINT_URL=proxy.url); it
forwards every request to the real server, except while a fault is active:

    proxy = FaultProxy(upstream="http://127.0.0.1:5000")
    proxy.add(Fault("status", seconds=10, status=500, code="InternalError", only=writes))
    proxy.add(Fault("drop", seconds=5))                 # read the request, close without answering
    proxy.add(Fault("delay", seconds=30, delay_s=2))    # answer, but 2 s late
    proxy.add(Fault("status", seconds=60, status=503, start_on=checkpoint_write))  # starts with a save
    ...
    proxy.close()

A fault starts when it is added, or at the first request `start_on(method, path)` accepts,
lasts `seconds`, and hits the requests `only(method, path)` accepts (all by default).
`fault.hits` counts the requests it answered, `fault.started_at` when it began
(time.monotonic()). The proxy runs in threads of the process that creates it and listens on
127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

RequestFilter = Callable[[str, str], bool]  # (method, path) -> bool

# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business, never forwarded.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
               "expect"}


def writes(method: str, path: str) -> bool:
    """Requests that store something: PUT (objects, parts), POST (multipart uploads), DELETE."""
    return method in ("PUT", "POST", "DELETE")


def checkpoint_write(method: str, path: str) -> bool:
    return writes(method, path) and "/checkpoints/step-" in path


@dataclass
class Fault:
    kind: Literal["status", "drop", "delay"]
    seconds: float  # how long it lasts once started
    status: int = 503  # kind "status": the HTTP status and S3 error code answered
    code: str = "ServiceUnavailable"
    delay_s: float = 0.0  # kind "delay": added before forwarding
    only: RequestFilter | None = None
    start_on: RequestFilter | None = None
    started_at: float | None = None
    hits: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def applies(self, method: str, path: str) -> bool:
        with self._lock:
            if self.started_at is None:
                if self.start_on is not None and not self.start_on(method, path):
                    return False
                self.started_at = time.monotonic()
            if time.monotonic() - self.started_at >= self.seconds:
                return False
            if self.only is not None and not self.only(method, path):
                return False
            self.hits += 1
            return True

    @property
    def over(self) -> bool:
        return self.started_at is not None and time.monotonic() - self.started_at >= self.seconds


class FaultProxy:
    def __init__(self, upstream: str):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.faults: list[Fault] = []
        self.forwarded = 0
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, fault: Fault) -> Fault:
        if fault.start_on is None:
            fault.started_at = time.monotonic()
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults = []

    def active_fault(self, method: str, path: str) -> Fault | None:
        for fault in list(self.faults):
            if fault.applies(method, path):
                return fault
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

    def log_message(self, *args) -> None:  # keep pytest output readable
        pass

    def _handle(self) -> None:
        body = self._read_body()
        fault = self.owner.active_fault(self.command, self.path)
        if fault is not None and fault.kind == "drop":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.kind == "status":
            self._answer_error(fault)
            return
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.delay_s)
        self._forward(body)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer_error(self, fault: Fault) -> None:
        body = b"" if self.command == "HEAD" else (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{fault.code}</Code><Message>injected by the fault proxy</Message>"
            "<RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        self.send_response(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, body: bytes) -> None:
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.owner.forwarded += 1
            self.send_response_only(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP_BY_HOP and not (key.lower() == "content-length" and self.command != "HEAD"):
                    self.send_header(key, value)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            upstream.close()
