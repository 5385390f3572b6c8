"""A fault-injecting S3 proxy: real HTTP in front of the embedded server.

Other processes use it through the endpoint URL (``proxy.env()`` gives the AWS
variables), so what they see is what a real store's bad minutes look like: an error
*reply*, a connection reset, or their own death right after a write landed. Every
request is forwarded unchanged (the Host header included, so SigV4 signatures stay
valid) unless a rule matches it::

    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.add("PUT", r"\\.parquet$", "slowdown", times=6)     # 503 SlowDown x6
        proxy.add("COPY", r"/manifest\\.json$", "kill", pid=proc.pid)  # SIGKILL after the copy
        proxy.add("GET", r"/_night\\.json$", "reset", seconds=5)   # resets for 5 s

Operations are named as S3 sees them: ``GET`` (an object), ``LIST`` (a GET on the
bucket), ``HEAD``, ``PUT``, ``COPY`` (a PUT with ``x-amz-copy-source``), ``POST``
(multipart, multi-object delete), ``DELETE``; ``*`` matches any. The pattern is a
regular expression searched in ``/bucket/key`` (path-style, query included).

Actions: ``slowdown`` (503 SlowDown), ``unavailable`` (503 ServiceUnavailable),
``internal`` (500 InternalError), ``denied`` (403 AccessDenied), ``reset`` (the
connection is closed with a TCP reset, nothing forwarded), ``refuse_keys`` (a
multi-object delete answered 200 with an AccessDenied error for every key, and
nothing deleted), ``delay`` (forwarded after ``pause`` seconds), and ``kill``: the
request is forwarded, so the write lands, then ``pid`` is sent SIGKILL before any
answer reaches it. A rule fires ``times`` times (after skipping the first ``skip``
matches), or for ``seconds`` from when it was added; :attr:`Rule.hits` counts.
:attr:`FaultProxy.max_in_flight` is the most requests of each operation it held at
once (concurrency as the store sees it).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "unavailable": (503, "ServiceUnavailable", "Service is unavailable."),
    "internal": (500, "InternalError", "We encountered an internal error."),
    "denied": (403, "AccessDenied", "Access Denied"),
}
ACTIONS = {*ERRORS, "reset", "kill", "refuse_keys", "delay"}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class Rule:
    op: str
    pattern: str
    action: str
    times: int | None = None
    seconds: float | None = None
    skip: int = 0
    pid: int | None = None
    pause: float = 0.0  # seconds, for "delay"
    hits: int = 0
    seen: int = 0
    added: float = field(default_factory=time.monotonic)

    def matches(self, op: str, path: str) -> bool:
        if self.op not in ("*", op) or not re.search(self.pattern, path):
            return False
        if self.seconds is not None and time.monotonic() - self.added > self.seconds:
            return False
        self.seen += 1
        if self.seen <= self.skip:
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


@dataclass
class Request:
    op: str
    path: str
    status: int
    action: str | None


def operation(method: str, path: str, headers: Any) -> str:
    if method == "PUT" and headers.get("x-amz-copy-source"):
        return "COPY"
    if method == "GET":
        bare = path.split("?", 1)[0].strip("/")
        if "/" not in bare:  # GET on a bucket: a listing
            return "LIST"
    return method


class FaultProxy:
    """Forwards S3 requests to ``upstream``; injects the faults of its rules."""

    def __init__(self, upstream: str):
        parsed = urlparse(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.rules: list[Rule] = []
        self.log: list[Request] = []
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for a process that should reach S3 through the proxy."""
        env = dict(os.environ if base is None else base)
        env["AWS_ENDPOINT_URL_S3"] = self.endpoint
        env.pop("AWS_ENDPOINT_URL", None)
        return env

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, op: str, pattern: str, action: str, **kwargs: Any) -> Rule:
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}; one of {sorted(ACTIONS)}")
        if action == "kill" and not kwargs.get("pid"):
            raise ValueError("a kill rule needs the pid to kill")
        rule = Rule(op.upper(), pattern, action, **kwargs)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()
            self.max_in_flight.clear()

    def requests(self, op: str = "*", pattern: str = "") -> list[Request]:
        with self._lock:
            return [r for r in self.log if op in ("*", r.op) and re.search(pattern, r.path)]

    def _rule_for(self, op: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(op, path):
                    return rule
        return None

    @contextlib.contextmanager
    def _holding(self, op: str) -> Any:
        with self._lock:
            self.in_flight[op] = self.in_flight.get(op, 0) + 1
            self.max_in_flight[op] = max(self.max_in_flight.get(op, 0), self.in_flight[op])
        try:
            yield
        finally:
            with self._lock:
                self.in_flight[op] -= 1

    def _record(self, op: str, path: str, status: int, action: str | None) -> None:
        with self._lock:
            self.log.append(Request(op, path, status, action))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> tuple[bytes, bool]:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks), True
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return (self.rfile.read(length) if length else b""), False

            def _reset(self) -> None:
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()

            def _error(self, status: int, code: str, message: str) -> None:
                body = (
                    '<?xml version="1.0" encoding="UTF-8"?>\n'
                    f"<Error><Code>{code}</Code><Message>{message}</Message>"
                    f"<Resource>{self.path}</Resource><RequestId>faultproxy</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _refuse_keys(self, body: bytes) -> None:
                keys = re.findall(rb"<Key>(.*?)</Key>", body)
                errors = b"".join(
                    b"<Error><Key>" + k + b"</Key><Code>AccessDenied</Code>"
                    b"<Message>Access Denied</Message></Error>"
                    for k in keys
                )
                data = b'<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult>' + errors
                data += b"</DeleteResult>"
                self.send_response(200)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _forward(self, body: bytes, chunked: bool) -> tuple[int, list[Any], bytes]:
                conn = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=120
                )
                try:
                    conn.putrequest(
                        self.command, self.path, skip_host=True, skip_accept_encoding=True
                    )
                    for key, value in self.headers.items():
                        if key.lower() not in HOP_BY_HOP:
                            conn.putheader(key, value)
                    if chunked:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders()
                    if body:
                        conn.send(body)
                    resp = conn.getresponse()
                    data = resp.read()
                    return resp.status, resp.getheaders(), data
                finally:
                    conn.close()

            def _handle(self) -> None:
                body, chunked = self._body()
                op = operation(self.command, self.path, self.headers)
                with proxy._holding(op):
                    self._answer(op, body, chunked)

            def _answer(self, op: str, body: bytes, chunked: bool) -> None:
                rule = proxy._rule_for(op, self.path)
                if rule is not None and rule.action in ERRORS:
                    proxy._record(op, self.path, ERRORS[rule.action][0], rule.action)
                    self._error(*ERRORS[rule.action])
                    return
                if rule is not None and rule.action == "refuse_keys":  # 200, yet none deleted
                    proxy._record(op, self.path, 200, "refuse_keys")
                    self._refuse_keys(body)
                    return
                if rule is not None and rule.action == "reset":
                    proxy._record(op, self.path, 0, "reset")
                    self._reset()
                    return
                if rule is not None and rule.action == "delay":
                    time.sleep(rule.pause)
                status, headers, data = self._forward(body, chunked)
                if rule is not None and rule.action == "kill":
                    proxy._record(op, self.path, status, "kill")
                    assert rule.pid is not None
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(rule.pid, signal.SIGKILL)
                    self._reset()
                    return
                proxy._record(op, self.path, status, None)
                self.send_response(status)
                skip = {*HOP_BY_HOP, "server", "date"}
                if self.command != "HEAD":  # a HEAD answer keeps the object's length
                    skip.add("content-length")
                for key, value in headers:
                    if key.lower() not in skip:
                        self.send_header(key, value)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler
