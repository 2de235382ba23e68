"""A fault-injecting HTTP proxy on loopback, between the GCS client and the emulator.

It forwards every request to the upstream server; on demand it answers 503, drops the
connection before forwarding, drops it *after* forwarding (the write happened, the reply is
lost), or answers 403 for chosen buckets. Faults are deterministic: every Nth request.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_BUCKET = re.compile(r"/b/([^/?]+)")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "content-length"}
MODES = ("503", "drop", "drop-after")


_PATH_NAME = re.compile(r"/b/[^/?]+/o/([^?]+)")
_BODY_NAME = re.compile(rb'"name":\s*"((?:[^"\\]|\\.)*)"')


def _object_name(path: str, body: bytes | None) -> str | None:
    """The object a request is about: in the URL (reads) or the upload's JSON metadata."""
    found = _PATH_NAME.search(path)
    if found:
        return unquote(found[1])
    if "/upload/" in path and body:
        named = _BODY_NAME.search(body[:4096])
        if named:
            return json.loads(b'"' + named[1] + b'"')
    return None


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hang up on purpose here (dropped connections); no tracebacks


class FaultProxy:
    def __init__(self, upstream: str, port: int) -> None:
        self.upstream = urlsplit(upstream)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.every = 0  # 0: no faults; N: every Nth request gets the next fault mode
        self.forbidden: set[str] = set()  # buckets answering 403
        self.forbidden_objects: set[str] = set()  # object-name prefixes answering 403
        self.injected: Counter[str] = Counter()
        self.requests = 0
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", port), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.every, self.forbidden, self.injected, self.requests = 0, set(), Counter(), 0
            self.forbidden_objects = set()
            self.seen = []

    def _decide(self, method: str, path: str, body: bytes | None) -> str | None:
        with self._lock:
            self.requests += 1
            self.seen.append((method, path))
            bucket = _BUCKET.search(path)
            name = _object_name(path, body)
            if name and any(name.startswith(prefix) for prefix in self.forbidden_objects):
                self.injected["403"] += 1
                return "403"
            if bucket and bucket[1] in self.forbidden:
                self.injected["403"] += 1
                return "403"
            if self.every and self.requests % self.every == 0:
                mode = MODES[sum(self.injected[m] for m in MODES) % len(MODES)]
                self.injected[mode] += 1
                return mode
        return None

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._decide(self.command, self.path, body)
                if fault == "403":
                    return self._reply(403, b'{"error":{"code":403,"message":"Forbidden"}}')
                if fault == "503":
                    return self._reply(503, b'{"error":{"code":503,"message":"injected"}}')
                if fault == "drop":
                    self.close_connection = True
                    return None
                upstream = http.client.HTTPConnection(proxy.upstream.hostname,
                                                      proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                upstream.request(self.command, self.path, body=body, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
                upstream.close()
                if fault == "drop-after":
                    self.close_connection = True
                    return None
                self.send_response(reply.status, reply.reason)
                for key, value in reply.getheaders():
                    if key.lower() not in _HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                return None

            def _reply(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _relay

        return Handler
