"""Ranged GETs on blocking sockets, read by the thread that hashes and writes the bytes.

Why this shape: a mirror's part threads consume every block (BLAKE3, the source's CRC, a
write: each releases the GIL). Reading the responses on an event loop instead (aiohttp on
fsspec's loop thread) and handing the blocks across costs CPU per block: aiohttp delivers
64 KiB pieces through its stream reader, each block is a join of them, and each hand-off
takes a lock and sometimes a wake-up. Here ``http.client`` reads a block straight from
the socket into one new ``bytes`` (its buffered reader fills the object with
``recv_into``), in the part's own thread, which waits on the socket with the GIL
released (measurements: bench/README.md).

What it keeps from the loop path: one request per call (a part), which the caller
resumes from its first missing byte (:func:`bdn.transfer.ranged.fetch_resumable`); an
origin that ignores ``Range`` has the bytes before the start dropped; a timeout for the
connect and one for every read; statuses mapped by the source (``refuse``) and transport
failures made retryable; redirects followed, credentials dropped when one leaves the
origin. Keep-alive connections are pooled per origin; a pooled one the server has closed
meanwhile is replaced once, before the response begins, as browsers and urllib3 do.
"""

from __future__ import annotations

import functools
import http.client
import socket
import ssl
import threading
from collections.abc import Callable, Iterator, Mapping
from urllib.parse import urljoin, urlsplit

from bdn.errors import AuthError, SourceError
from bdn.retry import RetryableError, is_retryable_status, parse_retry_after
from bdn.secrets import scrub
from bdn.transfer.files import Fetch
from bdn.transfer.options import STREAM_BLOCK_BYTES, DownloadOptions
from bdn.transfer.ranged import transport_error

USER_AGENT = "bdn-mirror/0.1"
MAX_REDIRECTS = 5
MAX_IDLE_PER_ORIGIN = 32
# Of an error response, enough to word the error; the rest is not read.
ERROR_BODY_BYTES = 4096
_REDIRECTS = (301, 302, 303, 307, 308)
# A pooled connection the server closed while idle fails like this on first use.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
          ConnectionAbortedError)

Origin = tuple[str, str, int]
# (status, headers, the start of the body) → the exception to raise
Refuse = Callable[[int, Mapping[str, str], str], BaseException]


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context per process: building one loads the CA bundle (about 0.1 s of
    CPU), which every source would otherwise pay again."""
    import httpx2

    return httpx2.create_ssl_context()


class RangeClient:
    """Ranged GETs over pooled keep-alive HTTP/1.1 connections; safe to share between
    threads (each request has its connection to itself)."""

    def __init__(self, options: DownloadOptions, *, user_agent: str) -> None:
        self.options = options
        self.user_agent = user_agent
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- the Fetch -------------------------------------------------------------------

    def fetcher(self, url: str, *, refuse: Refuse,
                headers: Callable[[], Mapping[str, str]] = dict,
                block_bytes: int = STREAM_BLOCK_BYTES) -> Fetch:
        """A :data:`~bdn.transfer.files.Fetch` of ``url``: each call one ranged GET, read
        in blocks of ``block_bytes``. ``headers()`` is asked per request (tokens
        expire); ``refuse`` makes the exception for a status other than 200/206."""

        def fetch(start: int, end: int) -> Iterator[bytes]:
            if start >= end:
                return
            origin, conn, resp = self._open(url, headers, start, end, refuse)
            reusable = False
            try:
                skip = start if resp.status == 200 else 0
                want = end - start
                while skip:  # the origin ignored Range and sent the whole object
                    dropped = len(resp.read(min(skip, block_bytes)))
                    if not dropped:
                        return  # cut short: the caller retries from the same byte
                    skip -= dropped
                while want:
                    block = resp.read(min(want, block_bytes))
                    if not block:
                        return
                    want -= len(block)
                    yield block
                # Only a response read to its end leaves the connection usable.
                reusable = resp.length == 0 and not resp.will_close
            except (OSError, http.client.HTTPException) as e:
                raise transport_error(e, f"reading {url_for_errors(url)}") from None
            finally:
                if reusable:
                    self._release(origin, conn)
                else:
                    conn.close()

        return fetch

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c.close()

    # -- requests --------------------------------------------------------------------

    def _open(self, url: str, headers: Callable[[], Mapping[str, str]], start: int,
              end: int, refuse: Refuse
              ) -> tuple[Origin, http.client.HTTPConnection, http.client.HTTPResponse]:
        """The response to ``GET url`` for bytes ``[start, end)``, redirects followed,
        with its status 200 or 206, and the origin that sent it."""
        target = url
        sent = {"User-Agent": self.user_agent, **headers(),
                "Range": f"bytes={start}-{end - 1}"}
        origin = _origin(target)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                conn, resp = self._request(origin, target, sent)
            except (OSError, http.client.HTTPException) as e:
                raise transport_error(e, f"requesting {url_for_errors(url)}") from None
            status = resp.status
            if status in (200, 206):
                if status == 206 and not _starts_at(resp.getheader("Content-Range"), start):
                    conn.close()
                    raise RetryableError(f"{url_for_errors(url)}: asked for bytes from "
                                         f"{start}, the origin answered "
                                         f"{resp.getheader('Content-Range')!r}")
                return origin, conn, resp
            location = resp.getheader("Location")
            try:
                body = resp.read(ERROR_BODY_BYTES)
            except (OSError, http.client.HTTPException):
                body = b""
            conn.close()
            if status in _REDIRECTS and location:
                target = urljoin(target, location)
                new_origin = _origin(target)
                if new_origin != origin:
                    # Credentials are for the origin asked, never for where it points.
                    sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
                origin = new_origin
                continue
            raise refuse(status, resp.headers, body.decode("utf-8", "replace"))
        raise SourceError(f"{url_for_errors(url)}: more than {MAX_REDIRECTS} redirects")

    def _request(self, origin: Origin, target: str, headers: Mapping[str, str]
                 ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = urlsplit(target)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = self._take(origin)
        if conn is not None:
            try:
                conn.request("GET", path, headers=dict(headers))
                return conn, conn.getresponse()
            except _STALE:
                conn.close()  # closed by the server while idle: once more, fresh
            except BaseException:
                conn.close()
                raise
        conn = self._connect(origin)
        try:
            conn.request("GET", path, headers=dict(headers))
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise

    # -- the pool --------------------------------------------------------------------

    def _connect(self, origin: Origin) -> http.client.HTTPConnection:
        scheme, host, port = origin
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, context=tls_context(),
                                               timeout=self.options.connect_timeout_s)
        else:
            conn = http.client.HTTPConnection(host, port,
                                              timeout=self.options.connect_timeout_s)
        conn.connect()
        assert conn.sock is not None
        # From here each read may wait this long for the next bytes: a stalled stream
        # is a failed one.
        conn.sock.settimeout(self.options.read_timeout_s)
        if conn.sock.family in (socket.AF_INET, socket.AF_INET6):
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _take(self, origin: Origin) -> http.client.HTTPConnection | None:
        with self._lock:
            conns = self._idle.get(origin)
            return conns.pop() if conns else None

    def _release(self, origin: Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            conns = self._idle.setdefault(origin, [])
            if not self._closed and len(conns) < MAX_IDLE_PER_ORIGIN:
                conns.append(conn)
                return
        conn.close()


def _origin(url: str) -> Origin:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise SourceError(f"{url_for_errors(url)}: not an http(s) URL")
    return scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80)


def _starts_at(content_range: str | None, start: int) -> bool:
    """Whether ``Content-Range: bytes a-b/n`` begins at ``start``."""
    if not content_range or not content_range.startswith("bytes "):
        return False
    first, _, _ = content_range[6:].partition("-")
    return first.strip() == str(start)


def url_for_errors(url: str) -> str:
    """``url`` without its query, which may carry a signature or a token."""
    return url.split("?", 1)[0]


def status_error(status: int, headers: Mapping[str, str], body: str, *, uri: str,
                 path: str, service: str) -> BaseException:
    """The usual mapping of an object store's refusal: denied → :class:`AuthError`
    (final), missing → :class:`SourceError` (final), throttled or failing →
    :class:`RetryableError` honouring ``Retry-After``, anything else final."""
    detail = scrub(" ".join(body.split())[:200])
    if status in (401, 403):
        return AuthError(f"source {uri}: reading {path}: access denied by {service} "
                         f"(HTTP {status}: {detail}); check the credentials secret",
                         source=uri, file=path, status=status)
    if status in (404, 410):
        return SourceError(f"source {uri}: reading {path}: not found", source=uri,
                           file=path, status=status)
    if is_retryable_status(status):
        return RetryableError(f"HTTP {status} from {service}", status=status,
                              retry_after_s=parse_retry_after(headers.get("Retry-After")))
    return SourceError(f"source {uri}: reading {path}: unexpected HTTP {status} from "
                       f"{service}: {detail}", source=uri, file=path, status=status)
