"""A real HTTP server on 127.0.0.1 with well-behaved and misbehaving routes.

Routes (GET only):

- ``/img/<name>``          the bytes given for ``name``, Content-Type from its extension
- ``/404``                 404
- ``/flaky500/<name>``     500 the first time for each name, then the image
- ``/slow/<ms>/<name>``    the image after ``ms`` milliseconds (at most 5,000)
- ``/redirect/<n>/<name>`` a chain of n 302 redirects ending at ``/img/<name>``
- ``/html``                an HTML page served as 200 image/jpeg (a lying server)
- ``/endless``             200 without Content-Length, bytes until the client leaves
- ``/huge``                Content-Length 100 MiB of zeros
- ``/huge-nolength``       100 MiB of zeros without Content-Length
- ``/trickle``             Content-Length 1000, one byte every 0.5 s
- ``/hang``                accepts the request, never answers
- ``/echo-host``           200 with the request's Host header as the body
- ``/slow-headers``        a 200 whose header block arrives one byte every 0.5 s (for up to 60 s)

``hits[path]`` counts requests per path. Every slow route gives up when the
client disconnects, when the server closes, or at a fixed bound, so closing the
server never waits on a handler.
"""

from __future__ import annotations

import mimetypes
import socket
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HUGE_SIZE = 100 * 1024 * 1024
TRICKLE_SIZE = 1000
TRICKLE_INTERVAL_S = 0.5
CHUNK = b"\0" * 65536
ENDLESS_LIMIT = 4 * 1024**3  # bytes; bounds /endless if a client never hangs up
HANG_LIMIT_S = 300.0         # bounds /hang if the server is never closed
SLOW_HEADER_BYTES = 120      # /slow-headers: 120 bytes at 0.5 s each, so a minute of headers
MAX_REDIRECTS = 100
SLOW_LIMIT_MS = 5000
HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Not found</title></head>"
             b"<body><p>This is not the image you asked for.</p></body></html>\n")


class _ServerClosing(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # socket timeout: a client that stops reading cannot pin a handler

    def log_message(self, format: str, *args) -> None:  # keep test output quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._untrack(self.connection)

    def do_GET(self) -> None:
        owner = self.server.owner
        path = urlsplit(self.path).path
        owner._count(path)
        route, _, rest = path.lstrip("/").partition("/")
        try:
            if route == "img":
                self._image(rest)
            elif route == "flaky500":
                if owner._first_flaky_request(rest):
                    self._reply(500, b"try again", "text/plain")
                else:
                    self._image(rest)
            elif route == "slow":
                delay, _, name = rest.partition("/")
                if delay.isdigit() and int(delay) <= SLOW_LIMIT_MS and not owner._closing.wait(int(delay) / 1000):
                    self._image(name)
                else:
                    self._reply(404, b"bad delay", "text/plain")
            elif route == "redirect":
                self._redirect(rest)
            elif route == "html":
                self._reply(200, HTML_PAGE, "image/jpeg")
            elif route == "endless":
                self._stream(None, ENDLESS_LIMIT)
            elif route == "huge":
                self._stream(HUGE_SIZE, HUGE_SIZE)
            elif route == "huge-nolength":
                self._stream(None, HUGE_SIZE)
            elif route == "trickle":
                self._trickle()
            elif route == "echo-host":
                self._reply(200, (self.headers.get("Host") or "").encode(), "text/plain")
            elif route == "slow-headers":
                self._slow_headers()
            elif route == "hang":
                owner._closing.wait(HANG_LIMIT_S)
                self.close_connection = True
            else:
                self._reply(404, b"not found", "text/plain")
        except (_ServerClosing, OSError):
            self.close_connection = True

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _image(self, name: str) -> None:
        body = self.server.owner.images.get(name)
        if body is None:
            self._reply(404, b"no such image", "text/plain")
            return
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        self._reply(200, body, content_type)

    def _redirect(self, rest: str) -> None:
        count, _, name = rest.partition("/")
        if not count.isdigit() or not 1 <= int(count) <= MAX_REDIRECTS or not name:
            self._reply(404, b"bad redirect", "text/plain")
            return
        n = int(count)
        self.send_response(302)
        self.send_header("Location", f"/img/{name}" if n == 1 else f"/redirect/{n - 1}/{name}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream(self, content_length: int | None, limit: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if content_length is not None:
            self.send_header("Content-Length", str(content_length))
        self.send_header("Connection", "close")
        self.end_headers()
        sent = 0
        while sent < limit:
            self._check_open()
            chunk = CHUNK[: limit - sent]
            self.wfile.write(chunk)
            sent += len(chunk)
        self.close_connection = True

    def _trickle(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(TRICKLE_SIZE))
        self.end_headers()
        for _ in range(TRICKLE_SIZE):
            self.wfile.write(b"x")
            if self.server.owner._closing.wait(TRICKLE_INTERVAL_S):
                raise _ServerClosing
        self.close_connection = True

    def _slow_headers(self) -> None:
        # Every byte comes well within a read timeout, so only a deadline on the whole request stops it.
        self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(SLOW_HEADER_BYTES):
            self.wfile.write(b"x")
            self.wfile.flush()
            if self.server.owner._closing.wait(TRICKLE_INTERVAL_S):
                raise _ServerClosing
        self.wfile.write(b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.close_connection = True

    def _check_open(self) -> None:
        if self.server.owner._closing.is_set():
            raise _ServerClosing


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # close() unblocks handlers itself; never join them
    owner: LocalHTTPServer

    def handle_error(self, request, client_address) -> None:
        # Clients that hang up or time out are what these routes are for: stay quiet.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class LocalHTTPServer:
    """The test HTTP server, serving ``images`` (name -> encoded bytes) under ``/img/``.

    Use as a context manager; ``base_url`` is e.g. ``http://127.0.0.1:40123``.
    """

    def __init__(self, images: dict[str, bytes] | None = None):
        self.images = dict(images or {})
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._flaky_served: set[str] = set()
        self._connections: set[socket.socket] = set()
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        host, port = self._server.server_address[:2]
        self.base_url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="test-http-server", daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` (e.g. ``/img/a.jpg``) on this server."""
        return self.base_url + path

    def close(self) -> None:
        """Stop serving and cut every open connection, including endless and hanging ones."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join()

    def __enter__(self) -> LocalHTTPServer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _count(self, path: str) -> None:
        with self._lock:
            self.hits[path] += 1

    def _first_flaky_request(self, name: str) -> bool:
        with self._lock:
            first = name not in self._flaky_served
            self._flaky_served.add(name)
            return first

    def _track(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)
