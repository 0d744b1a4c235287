"""The one fetch policy: every path that reads a file or URL goes through :func:`fetch`.

Local files must be regular files under the size cap, read without blocking on
a pipe or device. A URL gets the size cap while it is read (a declared length
over it is refused before the body), one deadline for the whole request
(connect, headers, redirects, body and retries together), and, where private
addresses are refused, is connected to the very address that was checked, on
every connection including redirects (no second DNS lookup for rebinding to
slip into).

Who may reach loopback and private addresses: the CLI's own loads and queries
(the user's machine, the user's files), the web app with ``--allow-private-urls``,
and PL/Python's ``similar_images`` only where the server was started with
``LOOKALIKE_ALLOW_PRIVATE_URLS=1`` in its environment (:func:`private_urls_allowed_here`:
whoever runs the server decides, never a session, role or database setting).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import stat
import time
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlparse, urlsplit

import httpcore
import httpx

from .errors import Unreachable

DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0          # seconds to connect, and between bytes
DEFAULT_DOWNLOAD_DEADLINE = 120.0  # seconds for everything one URL takes: connect, headers, redirects, body, retries
DEFAULT_RETRIES = 3
MAX_REDIRECTS = 5
PRIVATE_URLS_ENV = "LOOKALIKE_ALLOW_PRIVATE_URLS"   # in a database server's environment only


class FetchError(Unreachable):
    """A source that could not be read (missing, too large, too slow, HTTP error); ``reason``
    names no content and no credentials. A bad gateway to the web app (502), whatever the cause; to a
    PL/Python routine, an unusable value of the parameter that named it (22023)."""

    sqlstate = "22023"


class Refused(FetchError):
    """The source itself is not acceptable (a bad URL, scheme or address), as opposed to failing to fetch."""

    http_status = 400


# Paths travel as str with undecodable bytes as surrogates, and reach the OS as
# UTF-8 bytes: the same names whatever the locale (a C-locale PostgreSQL backend
# runs Python with an ASCII filesystem encoding).

def fs_bytes(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def fs_str(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = DEFAULT_TIMEOUT
    deadline: float = DEFAULT_DOWNLOAD_DEADLINE
    retries: int = DEFAULT_RETRIES
    backoff: float = 0.5


def make_client(limits: FetchLimits, concurrency: int = DEFAULT_CONCURRENCY, *,
                allow_private: bool = True) -> httpx.Client:
    """An HTTP client for :func:`fetch`; ``allow_private=False`` refuses loopback, private and other
    non-public addresses, for every connection including redirects."""
    pool = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    return httpx.Client(
        transport=_PinnedTransport(pool, allow_private), timeout=httpx.Timeout(limits.timeout),
        follow_redirects=True, max_redirects=MAX_REDIRECTS,
        headers={"User-Agent": "lookalike/0.1 (+image loader)"},
    )


def fetch(source: str, client: httpx.Client, limits: FetchLimits) -> bytes:
    """The bytes of a path, file:// URL or http(s) URL, within ``limits``; FetchError otherwise.

    Whether private addresses may be reached is the client's (:func:`make_client`).
    """
    if "://" not in source:
        return read_file(source, limits.max_bytes)
    try:
        parts = urlparse(source)
    except ValueError:
        raise Refused("not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        return read_file(fs_str(unquote_to_bytes(parts.path)), limits.max_bytes)
    if scheme not in ("http", "https"):
        raise Refused(f"unsupported URL scheme {_short(scheme)!r} (only http, https and file)")
    token = _deadline.set(time.monotonic() + limits.deadline)
    try:
        return _download(source, client, limits)
    finally:
        _deadline.reset(token)


def read_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; FetchError (naming no content) otherwise."""
    name = os.path.abspath(fs_bytes(path))
    try:
        # stat first, so a device is never opened; O_NONBLOCK, so a file swapped for a pipe can't block the open.
        mode = os.stat(name).st_mode
        if not stat.S_ISREG(mode):
            raise FetchError(_not_regular(mode))
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise FetchError(_os_reason(exc)) from None
    except ValueError:
        raise FetchError("invalid file name (NUL character)") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FetchError(_not_regular(info.st_mode))
        if info.st_size > max_bytes:
            raise FetchError(f"too large: {info.st_size} bytes, limit {max_bytes}")
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - size)):  # the cap holds as the file grows
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"too large: over {max_bytes} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise FetchError(_os_reason(exc)) from None
    finally:
        os.close(fd)


_OS_REASONS = {errno.ENOENT: "file not found", errno.ENOTDIR: "file not found", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ELOOP: "symlink loop", errno.EISDIR: "is a directory",
               errno.ENAMETOOLONG: "file name too long"}


def _os_reason(exc: OSError) -> str:
    # Never str(exc): it carries the path. The errno says enough.
    return _OS_REASONS.get(exc.errno) or f"cannot read: {os.strerror(exc.errno).lower() if exc.errno else 'I/O error'}"


def _not_regular(mode: int) -> str:
    return "is a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, pipe or socket)"


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _download(url: str, client: httpx.Client, limits: FetchLimits) -> bytes:
    last_reason, tries = "failed", 0
    for attempt in range(limits.retries + 1):
        if attempt:
            pause = limits.backoff * 2 ** (attempt - 1)
            if time.monotonic() + pause >= _deadline.get():
                break  # no time left for another try
            time.sleep(pause)
        tries += 1
        try:
            return _download_once(url, client, limits)
        except _Retryable as exc:
            last_reason = exc.reason
        except httpx.TooManyRedirects:
            raise FetchError(f"too many redirects (more than {MAX_REDIRECTS})") from None
        except httpx.UnsupportedProtocol:
            raise Refused("redirected to an unsupported URL scheme (only http and https)") from None
        except httpx.InvalidURL:
            raise Refused("not a valid URL") from None
        except httpx.TimeoutException:
            if time.monotonic() >= _deadline.get():
                raise FetchError(f"too slow: not finished in {limits.deadline:g} s") from None
            last_reason = "timed out"
        except httpx.TransportError as exc:
            last_reason = f"unreachable: {type(exc).__name__}"
    raise FetchError(f"{last_reason} (after {tries} attempt{'s' if tries > 1 else ''})")


class _Retryable(Exception):
    def __init__(self, reason: str):
        self.reason = reason


def _download_once(url: str, client: httpx.Client, limits: FetchLimits) -> bytes:
    with client.stream("GET", url) as response:
        status = response.status_code
        if status >= 500 or status == 429:
            raise _Retryable(f"HTTP {status}")
        if status >= 400:
            raise FetchError(f"HTTP {status}")
        if status != 200:
            raise FetchError(f"unexpected HTTP {status}")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_bytes:
            raise FetchError(f"too large: {int(declared)} bytes declared, limit {limits.max_bytes}")
        body = bytearray()
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > limits.max_bytes:
                raise FetchError(f"too large: over {limits.max_bytes} bytes")
        return bytes(body)


# The monotonic time by which the current fetch must be done; every socket step is cut to it.
_deadline: ContextVar[float] = ContextVar("lookalike_fetch_deadline", default=float("inf"))


def _time_left(timeout: float | None) -> float | None:
    """The timeout for one socket step: its own, cut to what is left until the fetch's deadline."""
    left = _deadline.get() - time.monotonic()
    if left <= 0:
        raise httpcore.ReadTimeout("deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake ends by the fetch's deadline,
    so a server that sends its headers (or anything) a byte at a time cannot stretch it."""

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _time_left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _time_left(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, _time_left(timeout)))

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


def resolve(host: str, port: int, *, allow_private: bool) -> list[str]:
    """The addresses ``host`` resolves to, each checked; Refused when private ones are not allowed."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise httpcore.ConnectError("cannot resolve the host name") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is loopback too
            if not ip.is_global or ip.is_multicast:
                raise Refused(f"refused: {_short(host)} is a {'loopback' if ip.is_loopback else 'non-public'} "
                              "address, and this server fetches public URLs only")
    return addresses


class _PinnedBackend(httpcore.NetworkBackend):
    """Resolves each host once, checks every address, then connects to a checked address:
    no second lookup between check and connect for DNS rebinding to slip into. The
    Host header and TLS server name stay the URL's, as httpcore sets them above this."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        failure = httpcore.ConnectError("the host name has no address")
        for address in resolve(host, port, allow_private=self.allow_private):
            try:
                return _DeadlineStream(self._inner.connect_tcp(address, port, _time_left(timeout),
                                                               local_address, socket_options))
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are not fetched")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _PinnedTransport(httpx.HTTPTransport):
    """httpx's own transport, over a connection pool whose connections _PinnedBackend makes."""

    def __init__(self, limits: httpx.Limits, allow_private: bool):
        super().__init__(limits=limits)
        # httpx has no parameter for the network backend; the pool it builds is replaced by the same one with ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PinnedBackend(allow_private))


def private_urls_allowed_here() -> bool:
    """Whether this process (a database server's backend) was started to let its callers reach private addresses."""
    return os.environ.get(PRIVATE_URLS_ENV) == "1"


def fetch_one(source: str, limits: FetchLimits = FetchLimits(), *, allow_private: bool,
              local_files: bool = True) -> bytes:
    """:func:`fetch` with a client of its own, for a single query image.

    ``local_files=False`` takes http(s) URLs only (the web app never reads its own
    files for a caller); ``allow_private=False`` refuses loopback, private and
    other non-public addresses.
    """
    if not local_files:
        try:
            parts = urlsplit(source.strip())
            if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
                raise Refused("only http:// and https:// URLs can be fetched")
        except ValueError:  # e.g. an unclosed [IPv6
            raise Refused("not a valid URL") from None
        source = source.strip()
    with make_client(limits, 1, allow_private=allow_private) as client:
        return fetch(source, client, limits)
