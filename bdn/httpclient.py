"""The one HTTP client layer of bdn's synchronous clients (agent, control, mirror, chains).

Every synchronous caller of an HTTP API in bdn — the agent client, the serving
runtime's event-stream reader, the control and mirror clients, a chainlet's stub — talks
through :class:`HttpClient`, so the things that are easy to get subtly wrong are written
once:

* **Transport.** urllib3, one pool manager per client (a client is thread-safe and
  reuses connections). A unix socket is one more transport, not a second client: an
  address ``http+unix://<percent-encoded socket path>/...`` (or ``socket_path=``) makes
  the client's pool connect to that ``AF_UNIX`` path (:class:`UnixHTTPConnection`).
* **Retries.** One loop, :func:`bdn.retry.retry_sync` with the caller's
  :class:`~bdn.retry.RetryPolicy` (its backoff, jitter and ``Retry-After`` floor). A
  request is tried again only when that cannot do a thing twice: a connection that was
  never opened, or an idempotent request (GET/HEAD/PUT/DELETE/OPTIONS, one carrying an
  ``Idempotency-Key``, or one its caller declares idempotent) that failed in transport or
  got a retryable status. A body that is a stream is never re-sent.
* **Errors.** A failure becomes a :class:`Failure` (status, the server's sentence from a
  ``{"error": ...}`` JSON body, the URL) and the caller's :class:`ErrorMap` turns it into
  the exception that caller has always raised (``AgentUnavailable``, ``ClientError``,
  ...). Messages carry the URL without credentials and never a header: the
  ``Authorization`` header and tokens stay out of every error and log line.
* **Streams.** :meth:`HttpClient.stream` hands back the response before its body is
  read; :meth:`StreamResponse.lines` yields lines as they arrive (bounded in length) and
  :meth:`StreamResponse.abort` wakes a reader blocked in another thread.

This module lives in ``bdn/`` because every package that has a client may import
``bdn`` (DESIGN.md's table); it imports nothing of ours beyond ``bdn.retry`` and the
error root.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import urllib3
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.exceptions import HTTPError as Urllib3Error

from bdn.errors import BdnError
from bdn.retry import (
    RetryableError,
    RetryPolicy,
    is_retryable_status,
    parse_retry_after,
    retry_sync,
)

__all__ = ["DEFAULT_TIMEOUT_S", "ErrorMap", "Failure", "HttpClient", "HttpError",
           "HttpTimeout", "HttpUnavailable", "Response", "ResponseError", "StreamResponse",
           "UnixHTTPConnection", "UnixHTTPConnectionPool", "redact_url", "split_url",
           "unix_url"]

DEFAULT_TIMEOUT_S = 60.0
UNIX_SCHEME = "http+unix"
# One line of a streamed answer (an event, a progress record) is small; longer is broken.
MAX_LINE_BYTES = 1 << 20
READ_CHUNK_BYTES = 64 * 1024
# An error body is a sentence; more than this is not worth holding or showing.
MAX_ERROR_BODY_BYTES = 64 * 1024
POOL_MAXSIZE = 32
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
IDEMPOTENCY_HEADER = "Idempotency-Key"


# -- errors ------------------------------------------------------------------------------

class HttpError(BdnError):
    """An HTTP exchange failed. ``status`` is the answer's (0: none came), ``url`` the
    request's without credentials, ``reason`` the server's sentence or the transport's."""

    def __init__(self, message: str, *, status: int = 0, url: str = "",
                 reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.url = url
        self.reason = reason


class HttpUnavailable(HttpError, ConnectionError):
    """No answer: the connection was refused, reset or broken off."""


class HttpTimeout(HttpUnavailable, TimeoutError):
    """No answer within the timeout (to connect, or between two reads)."""


class ResponseError(HttpError, ValueError):
    """An answer arrived but is malformed (a streamed line over its bound)."""


@dataclass(frozen=True)
class Failure:
    """One failed exchange, as an :class:`ErrorMap` sees it.

    ``message`` is the server's sentence (the ``error`` field of a JSON body, else the
    body's text, else the status's reason phrase) or, when no answer came, the
    transport's reason ("[Errno 111] Connection refused")."""

    method: str
    url: str
    status: int
    message: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    timed_out: bool = False

    @property
    def answered(self) -> bool:
        return self.status != 0

    def default_error(self) -> HttpError:
        if not self.answered:
            cls = HttpTimeout if self.timed_out else HttpUnavailable
            return cls(f"{self.method} {self.url}: no answer: {self.message}",
                       url=self.url, reason=self.message)
        return HttpError(f"{self.method} {self.url}: HTTP {self.status}: {self.message}",
                         status=self.status, url=self.url, reason=self.message)


ErrorFactory = Callable[[Failure], BaseException]


@dataclass(frozen=True)
class ErrorMap:
    """Which exception a caller raises for a failure: by status, for any other status,
    and when no answer came. Unset entries raise the layer's own :class:`HttpError`."""

    statuses: Mapping[int, ErrorFactory] = field(default_factory=dict)
    other: ErrorFactory | None = None
    unavailable: ErrorFactory | None = None

    def error(self, failure: Failure) -> BaseException:
        if not failure.answered:
            make = self.unavailable
        else:
            make = self.statuses.get(failure.status, self.other)
        return make(failure) if make is not None else failure.default_error()


# -- URLs --------------------------------------------------------------------------------

def unix_url(socket_path: str, path: str = "") -> str:
    """``http+unix://<percent-encoded socket path><path>``: a unix socket as one URL."""
    return f"{UNIX_SCHEME}://{quote(socket_path, safe='')}{path}"


def split_url(url: str) -> tuple[str, str]:
    """``(base, target)``: ``http://h:1/a?b`` → ``("http://h:1", "/a?b")``."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return urlunsplit((parts.scheme, parts.netloc, "", "", "")), target


def redact_url(url: str) -> str:
    """``url`` without user information (``http://user:secret@host`` → ``http://host``)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# -- the unix-socket transport -----------------------------------------------------------

class UnixHTTPConnection(HTTPConnection):
    """An HTTP connection to an ``AF_UNIX`` socket (the agent's local API)."""

    def __init__(self, host: str, port: int | None = None, *, socket_path: str,
                 **kw: Any) -> None:
        super().__init__(host, port, **kw)
        self.socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        timeout = self.timeout if isinstance(self.timeout, int | float) or \
            self.timeout is None else socket.getdefaulttimeout()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
        except TimeoutError as e:
            sock.close()
            raise ConnectTimeoutError(self, f"connecting to {self.socket_path} timed out "
                                            f"(timeout={timeout})") from e
        except OSError as e:
            sock.close()
            raise NewConnectionError(self, f"Failed to establish a new connection: {e}"
                                     ) from e
        return sock


class UnixHTTPConnectionPool(HTTPConnectionPool):
    """A pool of :class:`UnixHTTPConnection` to one socket path."""

    ConnectionCls = UnixHTTPConnection

    def __init__(self, socket_path: str, **kw: Any) -> None:
        # The socket path travels to each connection through urllib3's connection kwargs.
        super().__init__("localhost", None, socket_path=socket_path, **kw)
        self.socket_path = socket_path

    def __str__(self) -> str:
        return f"UnixHTTPConnectionPool(socket_path={self.socket_path!r})"


class _PoolManager(urllib3.PoolManager):
    """urllib3's manager, which also keeps the pools of unix sockets (closed with it)."""

    def unix_pool(self, socket_path: str) -> HTTPConnectionPool:
        key = (UNIX_SCHEME, socket_path)
        with self.pools.lock:
            pool = self.pools.get(key)  # type: ignore[call-overload]
            if pool is None:
                pool = UnixHTTPConnectionPool(socket_path, **self.connection_pool_kw)
                self.pools[key] = pool  # type: ignore[index]
            return pool  # type: ignore[no-any-return]


# -- answers -----------------------------------------------------------------------------

def error_message(body: bytes, fallback: str = "") -> str:
    """The server's sentence in an error body: a JSON object's ``error`` field, else the
    body's text, else ``fallback`` (the reason phrase)."""
    text = body.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("error"):
        err = doc["error"]
        return err if isinstance(err, str) else json.dumps(err)
    return text or fallback


@dataclass(frozen=True)
class Response:
    """A whole answer (status, headers, body)."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").partition(";")[0].strip().lower()

    def json(self) -> Any:
        """The body as JSON; ``None`` for an empty body."""
        return json.loads(self.body) if self.body else None

    def data(self) -> Any:
        """The body as JSON where it is JSON, else as text; ``None`` when empty."""
        try:
            return self.json()
        except ValueError:
            return self.body.decode("utf-8", "replace")


class StreamResponse:
    """An answer whose body is read as it arrives; close it (or use ``with``)."""

    def __init__(self, resp: urllib3.BaseHTTPResponse, url: str) -> None:
        self._resp = resp
        self._url = url
        self._finished = False
        self._lock = threading.Lock()
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").partition(";")[0].strip().lower()

    def read1(self, amt: int = READ_CHUNK_BYTES) -> bytes:
        """What has arrived (at least a byte, at most ``amt``); ``b""`` at the end."""
        try:
            data = self._resp.read1(amt)
        except ReadTimeoutError as e:
            raise HttpTimeout(f"{self._url}: the answer stalled: {e}", url=self._url,
                              reason=str(e)) from None
        except (ProtocolError, OSError) as e:
            raise HttpUnavailable(f"{self._url}: the answer broke off: {_reason(e)}",
                                  url=self._url, reason=_reason(e)) from None
        if not data:
            self._finished = True
        return data

    def read(self) -> bytes:
        chunks = []
        while chunk := self.read1():
            chunks.append(chunk)
        return b"".join(chunks)

    def lines(self, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[bytes]:
        """Each line (with its newline; the last may lack one) as soon as it is whole."""
        buf = bytearray()
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                if nl + 1 > max_line_bytes:
                    break
                line = bytes(buf[:nl + 1])
                del buf[:nl + 1]
                yield line
                continue
            if len(buf) > max_line_bytes:
                break
            chunk = self.read1()
            if not chunk:
                if buf:
                    yield bytes(buf)
                return
            buf += chunk
        raise ResponseError(f"{self._url}: a line of the answer exceeds {max_line_bytes} "
                            "bytes", status=self.status, url=self._url)

    def set_read_timeout(self, timeout_s: float | None) -> None:
        """From now on, wait at most ``timeout_s`` between two reads (None: forever)."""
        conn = self._resp.connection
        sock = getattr(conn, "sock", None)
        if sock is not None:
            sock.settimeout(timeout_s)

    def abort(self) -> None:
        """Wake a reader blocked in another thread: its read ends as if the body did."""
        conn = self._resp.connection
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Give the connection back when the body was read to its end, else drop it (an
        unfinished stream cannot be drained)."""
        with self._lock:
            if not self._finished:
                self._resp.close()
            self._resp.release_conn()

    def __enter__(self) -> StreamResponse:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# -- the client --------------------------------------------------------------------------

class _Unset:
    """The type of :data:`UNSET`: "leave this as it is" where None means something."""


UNSET = _Unset()


class _Retry(RetryableError):
    def __init__(self, failure: Failure, retry_after_s: float | None = None) -> None:
        super().__init__(failure.message, status=failure.status or None,
                         retry_after_s=retry_after_s)
        self.failure = failure


_URLLIB3_PREFIX = re.compile(r"^(<[^>]*>|\w+\([^)]*\)): ")


def _reason(e: BaseException) -> str:
    """The transport's own sentence, without urllib3's object reprs around it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and not isinstance(cur, Urllib3Error):
            return str(cur) or type(cur).__name__
        todo.extend([cur.__cause__, cur.__context__,
                     *(a for a in cur.args if isinstance(a, BaseException))])
    # urllib3 prefixes "<connection object>: " or "HTTPConnectionPool(host=..): ".
    return _URLLIB3_PREFIX.sub("", str(e))


class HttpClient:
    """One HTTP API at ``base_url`` (``http://``, ``https://``, ``http+unix://``).

    ``timeout_s`` bounds connecting and each read; ``retry`` (None: one attempt) is the
    policy of :func:`bdn.retry.retry_sync`; ``retry_status`` says which statuses are
    worth another attempt; ``errors`` maps failures to the caller's exceptions;
    ``headers`` go with every request (an ``Authorization`` among them is never shown);
    ``on_retry(attempt, failure, delay_s)`` hears of each failed attempt that is retried.
    """

    def __init__(self, base_url: str, *, socket_path: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 connect_timeout_s: float | None = None,
                 headers: Mapping[str, str] | None = None,
                 retry: RetryPolicy | None = None,
                 retry_status: Callable[[int], bool] = is_retryable_status,
                 errors: ErrorMap | None = None,
                 on_retry: Callable[[int, Failure, float], None] | None = None,
                 pool_maxsize: int = POOL_MAXSIZE) -> None:
        parts = urlsplit(base_url)
        if socket_path is None and parts.scheme == UNIX_SCHEME:
            socket_path = unquote(parts.netloc)
        if socket_path is None and (parts.scheme not in ("http", "https")
                                    or not parts.hostname):
            raise HttpError(f"{redact_url(base_url)}: not an http://, https:// or "
                            f"{UNIX_SCHEME}:// URL", url=redact_url(base_url))
        if socket_path is not None and not socket_path:
            raise HttpError("the unix socket path is empty", url=redact_url(base_url))
        self.base_url = base_url.rstrip("/")
        self.socket_path = socket_path
        self._prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.headers = dict(headers or {})
        self.retry = retry
        self.retry_status = retry_status
        self.errors = errors or ErrorMap()
        self.on_retry = on_retry
        self._manager = _PoolManager(num_pools=4, maxsize=pool_maxsize)
        self._pool = (self._manager.unix_pool(socket_path) if socket_path is not None
                      else self._manager.connection_from_url(base_url))

    def __repr__(self) -> str:  # never the headers: they may hold a key
        return f"HttpClient({redact_url(self.base_url)!r})"

    def close(self) -> None:
        self._manager.clear()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def url(self, target: str) -> str:
        """The URL of ``target`` as errors name it (no credentials)."""
        return redact_url(self.base_url + target)

    # -- requests ------------------------------------------------------------------------
    def request(self, method: str, target: str, *, json_body: Any = None,
                body: bytes | BinaryIO | None = None,
                headers: Mapping[str, str] | None = None, timeout_s: float | None = None,
                ok: Callable[[int], bool] | None = None,
                idempotent: bool | None = None) -> Response:
        """Send one request and read its whole answer.

        ``ok`` says which statuses are answers (default: 2xx; others go through the
        error map); ``json_body`` is encoded as JSON with its content type."""
        resp = self._send(method, target, json_body=json_body, body=body, headers=headers,
                          timeout_s=timeout_s, idempotent=idempotent, ok=ok, stream=False)
        assert isinstance(resp, Response)
        return resp

    def stream(self, method: str, target: str, *, json_body: Any = None,
               headers: Mapping[str, str] | None = None, timeout_s: float | None = None,
               read_timeout_s: float | _Unset | None = UNSET,
               ok: Callable[[int], bool] | None = None,
               idempotent: bool | None = None) -> StreamResponse:
        """Send one request; return once the answer's headers are in.

        ``timeout_s`` bounds connecting and the wait for the headers; after them, reads
        wait ``read_timeout_s`` (None: forever, for a stream that may be quiet a while;
        unset: ``timeout_s`` still)."""
        resp = self._send(method, target, json_body=json_body, body=None, headers=headers,
                          timeout_s=timeout_s, idempotent=idempotent, ok=ok, stream=True)
        assert isinstance(resp, StreamResponse)
        if not isinstance(read_timeout_s, _Unset):
            resp.set_read_timeout(read_timeout_s)
        return resp

    def _send(self, method: str, target: str, *, json_body: Any,
              body: bytes | BinaryIO | None, headers: Mapping[str, str] | None,
              timeout_s: float | None, idempotent: bool | None,
              ok: Callable[[int], bool] | None, stream: bool) -> Response | StreamResponse:
        method = method.upper()
        hdrs = dict(self.headers)
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS or any(
                k.lower() == IDEMPOTENCY_HEADER.lower() for k in hdrs)
        # A stream body is consumed by the first attempt: never send it twice.
        resendable = body is None or isinstance(body, bytes)
        # Without a policy a client makes one attempt and sees every answer as it came.
        retrying = self.retry is not None
        repeatable = retrying and idempotent and resendable
        t = self.timeout_s if timeout_s is None else timeout_s
        timeout = urllib3.Timeout(
            connect=t if self.connect_timeout_s is None else self.connect_timeout_s, read=t)
        path = self._prefix + target
        url = self.url(target)
        is_ok = ok or (lambda s: 200 <= s < 300)

        def attempt() -> Response | StreamResponse:
            try:
                raw = self._pool.urlopen(method, path, body=body, headers=hdrs,
                                         timeout=timeout, retries=False, redirect=False,
                                         preload_content=False, release_conn=False)
            except (Urllib3Error, OSError) as e:
                failure = Failure(method, url, 0, _reason(e),
                                  timed_out=isinstance(e, TimeoutError | ConnectTimeoutError
                                                       | ReadTimeoutError)
                                  and not isinstance(e, NewConnectionError))
                # A connection never opened carried nothing: always safe to try again.
                if repeatable or (retrying and resendable
                                  and isinstance(e, NewConnectionError)):
                    raise _Retry(failure) from None
                raise self.errors.error(failure) from None
            answer = StreamResponse(raw, url)
            wanted = is_ok(raw.status) and not (repeatable and self.retry_status(raw.status))
            if wanted and stream:
                return answer
            try:
                with answer:
                    data = answer.read() if wanted else _read_capped(answer)
            except HttpUnavailable as e:
                failure = Failure(method, url, 0, e.reason,
                                  timed_out=isinstance(e, HttpTimeout))
                if repeatable:
                    raise _Retry(failure) from None
                raise self.errors.error(failure) from None
            if wanted:
                return Response(raw.status, raw.headers, data)
            failure = Failure(method, url, raw.status,
                              error_message(data, raw.reason or ""), data, raw.headers)
            if repeatable and self.retry_status(raw.status):
                raise _Retry(failure, parse_retry_after(raw.headers.get("Retry-After")))
            raise self.errors.error(failure)

        def retried(n: int, e: BaseException, delay_s: float) -> None:
            if self.on_retry is not None and isinstance(e, _Retry):
                self.on_retry(n, e.failure, delay_s)

        try:
            return retry_sync(attempt, self.retry or RetryPolicy(attempts=1),
                              retry_on=(_Retry,), on_retry=retried)
        except _Retry as r:
            raise self.errors.error(r.failure) from None


def _read_capped(answer: StreamResponse) -> bytes:
    data = bytearray()
    while len(data) < MAX_ERROR_BODY_BYTES and (chunk := answer.read1()):
        data += chunk
    return bytes(data[:MAX_ERROR_BODY_BYTES])
