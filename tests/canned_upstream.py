"""A real HTTP server on 127.0.0.1 that answers what a test registered, ``responses``-style.

The transport talks to upstreams with urllib3 directly, which ``responses``
(a mock of ``requests``) cannot see, so the provider tests use this: a
``ThreadingHTTPServer`` on port 0 in a thread. Register answers by method
and path (the path includes the base URL's path, without the query); each
registration is used once in order and the last one repeats. Every request
is recorded in ``calls``, each with a ``request`` that has ``url``, ``path``,
``params``, ``headers`` (case-insensitive) and ``body``.
"""

import json as jsonlib
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

from tests.fake_upstream import Headers


@dataclass
class Request:
    method: str
    url: str
    path: str
    params: dict
    headers: Headers
    body: bytes


@dataclass
class Call:
    request: Request


@dataclass
class Canned:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    callback: object = None     # callback(request) -> (status, headers, body)
    delay: float = 0.0          # seconds before the answer


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that left (a test's read timeout, say) is not the server's error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class CannedUpstream:
    """Answer registered requests on 127.0.0.1; record every request."""

    def __init__(self):
        self.calls = []
        self._canned = {}
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()

    def add(self, method, path, *, status=200, json=None, body=b"", headers=None,
            content_type=None, callback=None, delay=0.0):
        """Answer ``method path`` with this (once per registration; the last one repeats)."""
        headers = dict(headers or {})
        if json is not None:
            body = jsonlib.dumps(json)
            headers.setdefault("Content-Type", "application/json")
        if content_type:
            headers["Content-Type"] = content_type
        body = body.encode() if isinstance(body, str) else body
        with self._lock:
            self._canned.setdefault((method, path), []).append(
                Canned(status, body, headers, callback, delay))

    def post(self, path, **kw):
        self.add("POST", path, **kw)

    def get(self, path, **kw):
        self.add("GET", path, **kw)

    def _answer(self, request):
        with self._lock:
            queue = self._canned.get((request.method, request.path))
            if not queue:
                return 599, {}, b"nothing registered for this request", 0.0
            canned = queue.pop(0) if len(queue) > 1 else queue[0]
        if canned.callback is not None:
            status, headers, body = canned.callback(request)
            return status, headers, body.encode() if isinstance(body, str) else body, 0.0
        return canned.status, canned.headers, canned.body, canned.delay

    def _handler(self):
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                request = Request(self.command, self.path, parts.path,
                                  dict(parse_qsl(parts.query)),
                                  Headers(self.headers.items()), body)
                upstream.calls.append(Call(request))
                status, headers, payload, delay = upstream._answer(request)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    self.close_connection = True  # the client left (a read timeout, say)

            do_GET = do_POST = _serve

        return Handler
