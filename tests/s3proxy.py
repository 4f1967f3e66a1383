"""A fault-injecting HTTP proxy for an S3 endpoint: a fraction of requests get 500 / 503
SlowDown or a dropped connection, half of them after the real request already landed; named
request headers can be dropped (a store that ignores If-None-Match, say). With fault_rate=0 it
is a request counter: ``counts`` tallies every request by kind (GET, HEAD, LIST, PUT, COPY,
DELETE, POST) and ``calls`` lists (kind, path) in order; ``writes()`` sums the kinds that change
the store; ``reset()`` starts over. ``on_landed(kind, path)`` runs once a request has landed and
before its answer goes back (a test acts between two requests of a client there). Requests must be path-style (``/bucket/key``), as boto3 sends
them to a loopback address."""
from __future__ import annotations

import http.client
import random
import sys
import threading
from collections import Counter
from typing import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
            b"<Message>We encountered an internal error. Please try again.</Message></Error>")
WRITE_KINDS = ("PUT", "COPY", "DELETE", "POST")
_HOP = ("connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client that went away (a worker stopped with connections open) is no error of ours."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def request_kind(method: str, path: str, headers) -> str:
    """The S3 operation a request is: LIST for a bucket-level GET, COPY for a PUT with a copy
    source, else the HTTP method (POST covers multi-object delete and multipart calls)."""
    if method == "PUT" and headers.get("x-amz-copy-source"):
        return "COPY"
    if method == "GET":
        bucket_path = path.split("?", 1)[0].strip("/")
        if "/" not in bucket_path or "list-type=" in path:
            return "LIST"
    return method


class FaultyS3Proxy:
    """Forwards to ``upstream`` (host, port); counts the faults it injected and every request
    by kind (``counts``)."""

    def __init__(self, upstream: tuple[str, int], fault_rate: float, seed: int = 0,
                 drop_headers: tuple[str, ...] = (), on_landed: Callable[[str, str], None] | None = None) -> None:
        self.upstream, self.fault_rate, self.on_landed = upstream, fault_rate, on_landed
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.faults = {"500": 0, "503": 0, "drop": 0, "after_landing": 0}
        self.requests = 0
        self.counts: Counter[str] = Counter()
        self.calls: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault, after = proxy._draw(request_kind(self.command, self.path, self.headers), self.path)
                if fault and not after:
                    return self._fail(fault)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP + drop_headers}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if proxy.on_landed is not None:
                    proxy.on_landed(request_kind(self.command, self.path, self.headers),
                                    unquote(self.path.split("?", 1)[0]))
                if fault:
                    return self._fail(fault)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                # HEAD answers carry the object's length, not the (empty) body's
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _fail(self, fault: str) -> None:
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, body = (503, SLOW_DOWN) if fault == "503" else (500, INTERNAL)
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _draw(self, kind: str, path: str) -> tuple[str | None, bool]:
        with self.lock:
            self.requests += 1
            self.counts[kind] += 1
            self.calls.append((kind, unquote(path.split("?", 1)[0])))
            if self.rng.random() >= self.fault_rate:
                return None, False
            fault = self.rng.choice(["500", "503", "drop"])
            after = self.rng.random() < 0.5
            self.faults[fault] += 1
            self.faults["after_landing"] += after
            return fault, after

    def writes(self) -> int:
        """Requests that change the store: PUT, COPY, DELETE and POST."""
        with self.lock:
            return sum(self.counts[k] for k in WRITE_KINDS)

    def snapshot(self) -> Counter[str]:
        """A copy of the counts by kind, safe to keep while requests go on."""
        with self.lock:
            return Counter(self.counts)

    def reset(self) -> None:
        """Zero the request counts (``requests``, ``counts``, ``calls``); fault tallies stay."""
        with self.lock:
            self.requests = 0
            self.counts.clear()
            self.calls.clear()

    def __enter__(self) -> FaultyS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
