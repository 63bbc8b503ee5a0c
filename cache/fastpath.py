"""Cache hits answered without aiohttp; every other request handed to aiohttp as is.

Why: a warm hit is one ``sendfile``, yet through aiohttp each request also costs a
``Request``, routing, a ``StreamResponse``, its header machinery, a task and the send's
futures and timers. On the 2-core loopback benchmark (``bench/cache.py``: 8 clients,
256 ranges of 8 MiB) the server spent 0.32–0.42 CPU-s per run where nginx spent
0.12–0.16, on the cores the clients also needed: that was the gap to nginx.

How: :class:`FastPathProtocol` is the listening socket's protocol. It reads each request
head itself and answers it here only when the answer is fully decided here — ``GET`` or
``HEAD`` over HTTP/1.1, no body, the path ``/v1/objects/b3:<hex>``, at most one
``Range`` and one ``If-None-Match``, nothing unusual in the head, and the object
complete on disk (:class:`HitSource` opens and pins it). The answer is a small state
machine on the loop's callbacks — no task, future or thread per request: the head and
the body under ``TCP_CORK`` (full segments, as nginx's ``tcp_nopush``), the body by
``sendfile`` in chunks of ``SENDFILE_MAX_CHUNK_BYTES`` with the other connections served
between chunks. Then it reads the next request on the connection.

Anything else — a miss, a manifest, ``/metrics``, a malformed or merely uncommon
request — and the connection, with every byte read so far, goes to aiohttp's own
protocol, which keeps it to its end. aiohttp thus stays the reference for every case
(misses and their single-flight fills, errors, 400s), and the fast path answers with
the same status, headers, body and ``Range`` rules (:mod:`cache.send`), which
``tests/cache/test_cache_fastpath.py`` compares request by request. A response that
cannot be sent whole aborts the connection (never a short body that looks complete).

The edge is bounded as aiohttp's is (:mod:`cache.edge`): a head that is too long, has
too many fields, a bare LF, or not exactly one ``Host`` goes to aiohttp, which refuses
it; one sweep per process closes connections past the idle or head timeout; and the
listening sockets are accepted from here, under a connection cap sized from the
descriptor limit, pausing (one log line per interval) at the cap or on ``EMFILE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import logging
import os
import re
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import BinaryIO, Protocol

from aiohttp import web

from cache.edge import (
    ACCEPT_BACKOFF_S,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    EdgeOptions,
    max_connections,
)
from cache.errors import RangeNotSatisfiableError
from cache.send import (
    OCTET_STREAM,
    SEND_POLL_SLICE_S,
    SEND_STALL_TIMEOUT_S,
    Sender,
    not_modified,
    object_headers,
    parse_range,
    prepare_range,
    range_if,
    range_refusal_body,
    send_file_response,
)
from manifests.digest import ALGORITHM, HEX_LENGTH

log = logging.getLogger(__name__)

# A request head longer than MAX_HEAD_BYTES, or with more than MAX_HEADERS fields, goes
# to aiohttp, which refuses it (cache.edge) — so both paths give the same answer.
# Pipelined bytes buffered while a response is sent, before reading is paused.
MAX_BUFFERED_BYTES = 64 * 1024
SERVER_HEADER = "bdn-cache"
LISTEN_BACKLOG = 1024
# Bytes per sendfile call before the loop serves others (nginx's sendfile_max_chunk).
SENDFILE_MAX_CHUNK_BYTES = 2 * 1024 * 1024
# Connections accepted per readable event of a listening socket (asyncio's: backlog).
ACCEPT_BATCH = 64
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_OBJECT_TARGET_RE = re.compile(rb"/v1/objects/(" + ALGORITHM.encode() +
                               rb":([0-9a-f]{" + str(HEX_LENGTH).encode() + rb"}))")
# Control characters (other than tab) anywhere in a head line: let aiohttp word the 400.
_CONTROL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Header values decoded as aiohttp decodes them (so error bodies quote them alike).
_AS_AIOHTTP = ("utf-8", "surrogateescape")
# Headers that mean a request is not a plain bodiless GET/HEAD.
_NOT_PLAIN = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
# Reason phrases as aiohttp words them (http.HTTPStatus): identical status lines.
_REASONS = {s: HTTPStatus(s).phrase for s in (200, 206, 304, 416)}


@dataclass(frozen=True, slots=True)
class FastRequest:
    """A request the fast path may answer: ``digest`` as ``b3:<hex>``."""

    head_only: bool
    digest: str
    hex: str
    range: str | None
    if_none_match: str | None
    close: bool
    if_range: str | None = None


def parse_head(head: bytes) -> FastRequest | None:
    """The request in ``head`` (its bytes up to, not including, the blank line), or
    None when it is not one the fast path answers."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in (b"GET", b"HEAD"):
        return None
    m = _OBJECT_TARGET_RE.fullmatch(parts[1])
    if m is None or _CONTROL_RE.search(head.replace(b"\r\n", b"")):
        return None
    if len(lines) - 1 > MAX_HEADERS:
        return None  # aiohttp words the 400
    rng: bytes | None = None
    inm: bytes | None = None
    if_range: bytes | None = None
    hosts = 0
    close = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        # Folded lines and spaces before the colon are errors aiohttp words.
        if not sep or not name or name[0] in b" \t" or name[-1] in b" \t":
            return None
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"range":
            if rng is not None:
                return None
            rng = value
        elif name == b"if-none-match":
            if inm is not None:
                return None
            inm = value
        elif name == b"if-range":
            if if_range is not None:
                return None
            if_range = value
        elif name == b"host":
            hosts += 1
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"upgrade" in tokens:
                return None
            close = close or b"close" in tokens
        elif name == b"content-length":
            if value != b"0":
                return None
        elif name in _NOT_PLAIN:
            return None
    if hosts != 1:
        return None  # HTTP/1.1 needs exactly one Host: aiohttp words the 400
    return FastRequest(head_only=parts[0] == b"HEAD", digest=m.group(1).decode(),
                       hex=m.group(2).decode(),
                       range=None if rng is None else rng.decode(*_AS_AIOHTTP),
                       if_none_match=None if inm is None else inm.decode(*_AS_AIOHTTP),
                       close=close,
                       if_range=None if if_range is None else if_range.decode(*_AS_AIOHTTP))


@dataclass(slots=True)
class OpenObject:
    """A complete object, opened (and pinned) for one response by a :class:`HitSource`;
    ``key``: whatever the source needs to release it."""

    file: BinaryIO
    size: int
    key: object = None


class HitSource(Protocol):
    """Where the fast path finds complete objects, and what it tells of each hit: the
    owner (:class:`cache.serve_objects.ObjectAnswers`: index, pins, metrics) or a hit
    worker (:class:`cache.worker.WorkerServer`: object files, ``flock``, notes).

    ``hooks_last_byte``: whether :meth:`before_last_byte` does anything (if not, the
    body goes out in one piece rather than all but its last byte, then that byte).
    """

    hooks_last_byte: bool

    def open_hit(self, hex_: str) -> OpenObject | None:
        """The object opened and pinned, or None (absent, filling, being evicted)."""

    def hit_started(self, obj: OpenObject, hex_: str, nbytes: int) -> None:
        """Before the response's first byte; ``nbytes``: the body it will carry."""

    def before_last_byte(self, obj: OpenObject) -> None:
        """All of the body but its last byte is out (or, with no body, before it)."""

    def hit_ended(self, obj: OpenObject, nbytes: int, whole: bool) -> None:
        """The response went out (``whole``) or broke off: release the object."""


def if_none_match(request: web.Request) -> str | None:
    """The request's ``If-None-Match`` list, its several fields joined (RFC 9110 §5.3)."""
    values = request.headers.getall("If-None-Match", [])
    return ", ".join(values) if values else None


async def answer_hit(request: web.Request, source: HitSource, sender: Sender,
                     obj: OpenObject, hex_: str, headers: dict[str, str]
                     ) -> web.StreamResponse:
    """The same answer through aiohttp, for a hit the fast path did not take: one on a
    connection already handed off, or a request it leaves to aiohttp (HTTP/1.0, an
    uncommon header, a percent-encoded path)."""
    nbytes = 0
    whole = False
    digest = f"{ALGORITHM}:{hex_}"
    try:
        if not_modified(if_none_match(request), headers["ETag"]):
            source.hit_started(obj, hex_, 0)
            whole = True
            return web.Response(status=304, headers=headers)
        prep = prepare_range(request, digest, obj.size, headers)
        if isinstance(prep, web.Response):
            source.hit_started(obj, hex_, 0)
            whole = True
            return prep
        status, start, end = prep
        nbytes = 0 if request.method == "HEAD" else end - start
        source.hit_started(obj, hex_, nbytes)
        resp, whole = await send_file_response(
            request, sender, obj.file, status, start, end, headers,
            before_last_byte=(lambda: source.before_last_byte(obj))
            if source.hooks_last_byte else None)
        return resp
    finally:
        source.hit_ended(obj, nbytes, whole)


class FastPath:
    """One process's fast path: its settings, its open fast connections (so shutdown
    can close them) and one timer that ends sends which make no progress."""

    def __init__(self, source: HitSource, sender: Sender, worker: str,
                 edge: EdgeOptions | None = None) -> None:
        """``worker``: the process's index as ``X-Bdn-Worker`` names it; ``sender``'s
        stop (:meth:`Sender.stop`) also ends this path's sends; ``edge``: timeouts."""
        self.source = source
        self.sender = sender
        self.worker = worker
        self.edge = edge or EdgeOptions()
        self.connections: set[FastPathProtocol] = set()
        self.max_connections = max_connections()
        self._idle_sweep: asyncio.TimerHandle | None = None
        # Listening sockets accepted from here (see _accept), and their state.
        self._listening: list[socket.socket] = []
        self._accepting = False
        self._resume: asyncio.TimerHandle | None = None
        self._logged_at = -ACCEPT_BACKOFF_S
        self._refused = 0
        self._accept_tasks: set[asyncio.Task[object]] = set()
        self._aiohttp_connections: Callable[[], int] = lambda: 0
        self._accept_factory: Callable[[], asyncio.Protocol] | None = None
        self._paused_at_cap = False
        self._closed: asyncio.Event | None = None
        self._shutting_down = False
        self._sweep: asyncio.TimerHandle | None = None
        # Our own edge-triggered epoll for "writable again": each connection is
        # registered once, and waiting costs no epoll_ctl per response (the loop's
        # level-triggered add_writer/remove_writer did, twice). Its fd is one reader of
        # the loop.
        self._ep: select.epoll | None = None
        self._by_fd: dict[int, FastPathProtocol] = {}
        self._date_s = -1
        self._date = ""

    def factory(self, aiohttp_factory: Callable[[], asyncio.Protocol]
                ) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for a listening socket; ``aiohttp_factory`` is the
        aiohttp runner's ``server``."""
        return lambda: FastPathProtocol(self, aiohttp_factory)

    async def listen(self, aiohttp_factory: Callable[[], asyncio.Protocol], *,
                     host: str = "", port: int = 0, sock: socket.socket | None = None,
                     reuse_port: bool = False, backlog: int = LISTEN_BACKLOG
                     ) -> asyncio.Server:
        """Listen on ``sock``, or on ``host``:``port``, with this fast path in front of
        ``aiohttp_factory`` (an aiohttp runner's ``server``). To stop: :meth:`shutdown`.

        asyncio makes the listening sockets (every address family of ``host``), but
        accepting is done here (:meth:`_accept`): under the connection cap, and with one
        pause and one log line per interval when descriptors run out."""
        loop = asyncio.get_running_loop()
        factory = self.factory(aiohttp_factory)
        if sock is not None:
            server = await loop.create_server(factory, sock=sock, backlog=backlog,
                                              start_serving=False)
        else:
            server = await loop.create_server(factory, host, port, reuse_address=True,
                                              reuse_port=reuse_port or None,
                                              backlog=backlog, start_serving=False)
        self._accept_factory = factory
        connections = getattr(aiohttp_factory, "connections", None)
        if connections is not None:  # aiohttp's web.Server: the connections handed off
            self._aiohttp_connections = lambda: len(connections)
        for tsock in server.sockets:
            # A dup: asyncio's TransportSocket offers no accept(); ours is closed by
            # _stop_accepting, the original by the server's close().
            lsock = socket.socket(tsock.family, tsock.type, fileno=os.dup(tsock.fileno()))
            lsock.setblocking(False)
            lsock.listen(backlog)
            self._listening.append(lsock)
            loop.add_reader(lsock.fileno(), self._accept, lsock, factory)
        self._accepting = True
        return server

    def open_connections(self) -> int:
        """Connections open in this process: accepted and being set up, on the fast
        path, and handed to aiohttp."""
        return (len(self._accept_tasks) + len(self.connections)
                + self._aiohttp_connections())

    def _accept(self, lsock: socket.socket,
                factory: Callable[[], asyncio.Protocol]) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            if self.open_connections() >= self.max_connections:
                self._pause_accepting(f"{self.open_connections()} connections open, the "
                                      f"most this process answers "
                                      f"({self.max_connections}, from its descriptor "
                                      "limit)", at_cap=True)
                return
            try:
                conn, _ = lsock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                if e.errno in _OUT_OF_RESOURCES:
                    self._pause_accepting(f"accept() failed: {os.strerror(e.errno)}")
                else:
                    self._log_refusal(f"accept() failed: {e}")
                return
            conn.setblocking(False)
            task = loop.create_task(loop.connect_accepted_socket(factory, conn))
            self._accept_tasks.add(task)
            task.add_done_callback(self._accepted)

    def _accepted(self, task: asyncio.Task[object]) -> None:
        self._accept_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log_refusal(f"a connection could not be set up: {task.exception()}")

    def _pause_accepting(self, why: str, *, at_cap: bool = False) -> None:
        """Stop accepting for ``ACCEPT_BACKOFF_S`` (``at_cap``: or until a connection
        closes): clients wait in the backlog (or are refused by the kernel) while the
        ones connected are still answered."""
        self._paused_at_cap = at_cap
        if self._accepting:
            self._accepting = False
            loop = asyncio.get_running_loop()
            for lsock in self._listening:
                loop.remove_reader(lsock.fileno())
            self._resume = loop.call_later(ACCEPT_BACKOFF_S, self._resume_accepting)
        self._log_refusal(f"{why}; not accepting for {ACCEPT_BACKOFF_S:.0f} s")

    def _resume_accepting(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._accepting or self._shutting_down:
            return
        loop = asyncio.get_running_loop()
        for lsock in self._listening:
            loop.add_reader(lsock.fileno(), self._accept, lsock, self._accept_factory)
        self._accepting = True

    def _log_refusal(self, message: str) -> None:
        """At most one line per ``ACCEPT_BACKOFF_S``, with how many were held back."""
        now = time.monotonic()
        if now - self._logged_at < ACCEPT_BACKOFF_S:
            self._refused += 1
            return
        more = f" ({self._refused} more since the last line)" if self._refused else ""
        log.warning("cache port: %s%s", message, more)
        self._logged_at = now
        self._refused = 0

    def _stop_accepting(self) -> None:
        loop = asyncio.get_running_loop()
        if self._accepting:
            for lsock in self._listening:
                loop.remove_reader(lsock.fileno())
        self._accepting = False
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for lsock in self._listening:
            lsock.close()
        self._listening = []

    def register(self, conn: FastPathProtocol, fd: int) -> None:
        """Tell ``conn`` (:meth:`FastPathProtocol.writable`) when ``fd`` takes bytes
        again after a send that would have blocked."""
        if self._ep is None:
            self._ep = select.epoll()
            asyncio.get_running_loop().add_reader(self._ep.fileno(), self._dispatch)
        self._ep.register(fd, select.EPOLLOUT | select.EPOLLET)
        self._by_fd[fd] = conn

    def unregister(self, fd: int) -> None:
        if self._by_fd.pop(fd, None) is not None and self._ep is not None:
            with contextlib.suppress(OSError):
                self._ep.unregister(fd)

    def _dispatch(self) -> None:
        assert self._ep is not None
        for fd, _ in self._ep.poll(0):
            conn = self._by_fd.get(fd)
            if conn is not None:
                conn.writable()

    def date(self) -> str:
        now = int(time.time())
        if now != self._date_s:
            self._date_s, self._date = now, email.utils.formatdate(now, usegmt=True)
        return self._date

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def add(self, conn: FastPathProtocol) -> None:
        self.connections.add(conn)
        if self._idle_sweep is None:
            self._idle_sweep = asyncio.get_running_loop().call_later(
                self.edge.sweep_interval_s, self._check_idle)

    def forget(self, conn: FastPathProtocol) -> None:
        self.connections.discard(conn)
        if self._closed is not None and not self.connections:
            self._closed.set()
        if (self._paused_at_cap and not self._accepting and not self._shutting_down
                and self.open_connections() < self.max_connections):
            self._resume_accepting()  # a descriptor came free: no need to wait

    def _check_idle(self) -> None:
        """Close connections past their idle or head timeout (one timer for them all,
        not one per request); resume accepting once under the cap again."""
        self._idle_sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        edge = self.edge
        for conn in list(self.connections):
            if conn.sending:
                continue  # the send stall watch (_check_sends) bounds a send
            if conn.head_at is None:
                if now - conn.idle_at >= edge.idle_timeout_s:
                    conn.close_idle()
            elif now - conn.head_at >= edge.header_timeout_s:
                conn.close_idle()
        if (self._paused_at_cap and not self._accepting and not self._shutting_down
                and self.open_connections() < self.max_connections):
            self._resume_accepting()  # aiohttp's connections closed (no callback here)
        if self.connections:
            self._idle_sweep = loop.call_later(edge.sweep_interval_s, self._check_idle)

    def watch(self) -> None:
        """A send started: make sure the stall sweep runs."""
        if self._sweep is None:
            loop = asyncio.get_running_loop()
            self._sweep = loop.call_later(SEND_POLL_SLICE_S, self._check_sends)

    def _check_sends(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        busy = False
        for conn in list(self.connections):
            if not conn.sending:
                continue
            if self.sender.stopping.is_set() or now - conn.progress_at >= SEND_STALL_TIMEOUT_S:
                conn.abort()  # a stalled client, or a server that must stop
            else:
                busy = True
        if busy:
            self._sweep = loop.call_later(SEND_POLL_SLICE_S, self._check_sends)

    async def shutdown(self, public: asyncio.Server | None, timeout_s: float) -> None:
        """Stop listening on ``public`` (from :meth:`listen`); close idle connections
        now, busy ones after their response (sends to stalled clients end within
        ``SEND_POLL_SLICE_S``, as aiohttp's shutdown has them do); abort whatever is
        left after ``timeout_s``. Then clean the aiohttp runner up."""
        self._stop_accepting()
        if public is not None:
            public.close()
        self.sender.stop()
        self._shutting_down = True
        self._closed = asyncio.Event()
        for conn in list(self.connections):
            conn.close_when_idle()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout_s)
        for conn in list(self.connections):
            conn.abort()
        for handle in (self._sweep, self._idle_sweep):
            if handle is not None:
                handle.cancel()
        self._sweep = self._idle_sweep = None
        if self._ep is not None:
            asyncio.get_running_loop().remove_reader(self._ep.fileno())
            self._ep.close()
            self._ep = None


class FastPathProtocol(asyncio.Protocol):
    """One connection (see the module docstring): a small state machine driven by the
    loop's callbacks — no task, future or thread per request, which is most of what a
    request cost in Python."""

    def __init__(self, fast: FastPath, aiohttp_factory: Callable[[], asyncio.Protocol]
                 ) -> None:
        self._fast = fast
        self._aiohttp_factory = aiohttp_factory
        self._transport: asyncio.Transport | None = None
        self._sock: socket.socket | None = None
        self._tcp = False
        self._buf = bytearray()
        self._paused = False
        self._close_when_idle = False
        self._driving = False
        # The response being sent: the head still to send, then file bytes [pos, stop);
        # stop < end while the last byte waits for HitSource.before_last_byte.
        self.sending = False
        self.progress_at = 0.0
        self._req: FastRequest | None = None
        self._obj: OpenObject | None = None
        self._nbytes = 0
        self._pending = b""
        self._pos = self._stop = self._end = 0
        self._waiting = False
        self._corked = False
        # Loop time since which the connection waits for a request (idle timeout), and
        # when the first byte of an incomplete head arrived (head timeout; None: none).
        self.idle_at = 0.0
        self.head_at: float | None = None

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if self._fast.shutting_down:
            transport.close()
            return
        tsock = transport.get_extra_info("socket")
        if tsock is None:  # no socket to send files to: aiohttp serves it all
            self._hand_off()
            return
        # Our own descriptor for the connection: the transport has its fd registered
        # with the loop, and waiting for writability needs one of our own.
        try:
            fd = os.dup(tsock.fileno())
        except OSError:  # out of descriptors: aiohttp needs none of its own
            self._hand_off()
            return
        self._sock = socket.socket(fileno=fd)
        self._sock.setblocking(False)
        self._tcp = self._sock.family in (socket.AF_INET, socket.AF_INET6)
        if self._tcp:
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.idle_at = asyncio.get_running_loop().time()
        self._fast.add(self)
        self._fast.register(self, self._sock.fileno())

    def data_received(self, data: bytes) -> None:
        if not self._buf and not self.sending:
            self.head_at = asyncio.get_running_loop().time()
        self._buf += data
        if not self.sending:
            self._next()
        elif len(self._buf) > MAX_BUFFERED_BYTES and not self._paused:
            assert self._transport is not None
            self._transport.pause_reading()
            self._paused = True

    def eof_received(self) -> bool | None:
        return None  # the transport closes; a response in flight ends with it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sending:
            self._end_response(whole=False)
        self._close_sock()
        self._fast.forget(self)

    # -- driving -------------------------------------------------------------------

    def close_when_idle(self) -> None:
        self._close_when_idle = True
        if not self.sending and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def close_idle(self) -> None:
        """A timeout passed with no request (or an incomplete head): close, as aiohttp's
        keep-alive timer does — no answer, the client may retry on a new connection."""
        if self._transport is not None:
            self._transport.close()

    def _next(self) -> None:
        """Answer buffered requests while each completes at once; then wait for more
        bytes or for the socket; hand off what the fast path does not answer."""
        if self._driving:
            return  # called back from inside the loop below: it goes on by itself
        self._driving = True
        try:
            while not self.sending and self._sock is not None:
                end = self._buf.find(b"\r\n\r\n")
                head_len = len(self._buf) if end < 0 else end
                # A head too long, whenever its end arrives, or with a bare LF (which
                # would never end in CRLF CRLF): aiohttp refuses it (and bounds it).
                if head_len > MAX_HEAD_BYTES or (
                        self._buf.count(b"\n", 0, head_len)
                        != self._buf.count(b"\r\n", 0, head_len + 1)):
                    self._hand_off()
                    return
                if end < 0:
                    return
                self.head_at = None
                req = parse_head(bytes(self._buf[:end]))
                obj = None if req is None else self._fast.source.open_hit(req.hex)
                if req is None or obj is None:
                    self._hand_off()
                    return
                del self._buf[:end + 4]
                self._start(req, obj)
        finally:
            self._driving = False

    def _hand_off(self) -> None:
        """aiohttp takes the connection, with what was read of it, to its end."""
        transport = self._transport
        assert transport is not None
        self._fast.forget(self)
        self._close_sock()
        if transport.is_closing():
            return
        proto = self._aiohttp_factory()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            proto.data_received(data)
        if self._paused:
            self._paused = False
            transport.resume_reading()

    def _close_sock(self) -> None:
        if self._sock is not None:
            self._fast.unregister(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _start(self, req: FastRequest, obj: OpenObject) -> None:
        source = self._fast.source
        try:
            status, start, end, body, headers = self._plan(req, obj)
        except BaseException:
            source.hit_ended(obj, 0, False)  # never leave it open and pinned
            raise
        # From here a failure ends in connection_lost, which ends the response.
        nbytes = end - start if status in (200, 206) and not req.head_only else 0
        self._req, self._obj, self._nbytes = req, obj, nbytes
        self.sending = True
        self.progress_at = asyncio.get_running_loop().time()
        source.hit_started(obj, req.hex, nbytes)
        head = self._head(status, headers, end - start if status != 304 else None,
                          req.close)
        if nbytes:
            self._pending = head
            self._pos, self._end = start, end
            self._stop = end - 1 if source.hooks_last_byte else end
            if self._tcp:
                # Head and body leave in full segments (as nginx's tcp_nopush): fewer,
                # larger segments for the client to take; uncorked after the last byte.
                try:
                    self._sock.setsockopt(  # type: ignore[union-attr]
                        socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                    self._corked = True
                except OSError:
                    pass
        else:
            source.before_last_byte(obj)
            self._pending = head + body
            self._pos = self._stop = self._end = 0
        self._fast.watch()
        self._pump()

    def _pump(self) -> None:
        """Send what the socket takes now; at most ``SENDFILE_MAX_CHUNK_BYTES`` per
        call, then back to the loop, so one fast client never holds up the others'
        next requests. A send that would block waits for :meth:`writable`."""
        sock, obj = self._sock, self._obj
        if sock is None or obj is None:
            return
        try:
            while self._pending:
                n = sock.send(self._pending)
                self._pending = self._pending[n:]
            while self._pos < self._end:
                if self._pos == self._stop:  # only the last byte is left
                    self._fast.source.before_last_byte(obj)
                    self._stop = self._end
                n = os.sendfile(sock.fileno(), obj.file.fileno(), self._pos,
                                min(self._stop - self._pos, SENDFILE_MAX_CHUNK_BYTES))
                if n == 0:
                    raise ConnectionResetError("file ended before the response did")
                self._pos += n
                loop = asyncio.get_running_loop()
                self.progress_at = loop.time()
                if self._pos < self._end:
                    # Likely still writable (a client's receive buffer takes a lot):
                    # come back after the others rather than through the selector.
                    loop.call_soon(self._pump)
                    return
        except BlockingIOError:
            # Edge-triggered: the socket is full now, so its next "writable" is an edge.
            self._waiting = True
            return
        except OSError:
            self._end_response(whole=False)
            return
        self._end_response(whole=True)

    def writable(self) -> None:
        """The socket took bytes again (or failed): go on if a send was waiting."""
        if self._waiting:
            self._waiting = False
            self._pump()

    def _end_response(self, *, whole: bool) -> None:
        obj, req = self._obj, self._req
        assert obj is not None and req is not None
        self._obj = self._req = None
        self._pending = b""
        self.sending = False
        self._waiting = False
        if self._corked:
            self._corked = False
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        self._fast.source.hit_ended(obj, self._nbytes, whole)
        transport = self._transport
        assert transport is not None
        if not whole:
            transport.abort()  # never a short body that looks complete
            self._close_sock()
        elif req.close or self._close_when_idle:
            transport.close()
            self._close_sock()
        else:
            if self._paused:
                self._paused = False
                transport.resume_reading()
            now = asyncio.get_running_loop().time()
            self.idle_at = now
            self.head_at = now if self._buf else None
            self._next()

    def _plan(self, req: FastRequest, obj: OpenObject
              ) -> tuple[int, int, int, bytes, dict[str, str]]:
        """(status, start, end, body of a non-200/206 answer, headers)."""
        headers = object_headers(req.digest, OCTET_STREAM, "hit", self._fast.worker)
        if not_modified(req.if_none_match, headers["ETag"]):
            return 304, 0, 0, b"", headers
        try:
            rng = parse_range(range_if(req.range, req.if_range, headers["ETag"]), obj.size)
        except RangeNotSatisfiableError as e:
            headers["Content-Range"] = f"bytes */{obj.size}"
            headers["Content-Type"] = "application/json; charset=utf-8"  # as aiohttp's
            body = range_refusal_body(e, req.digest).encode()
            return 416, 0, len(body), body, headers
        if rng is None:
            return 200, 0, obj.size, b"", headers
        headers["Content-Range"] = f"bytes {rng[0]}-{rng[1] - 1}/{obj.size}"
        return 206, rng[0], rng[1], b"", headers

    def _head(self, status: int, headers: dict[str, str], length: int | None,
              close: bool) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        lines.append(f"Date: {self._fast.date()}")
        lines.append(f"Server: {SERVER_HEADER}")
        if close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


__all__ = ["FastPath", "FastPathProtocol", "FastRequest", "HitSource", "OpenObject",
           "answer_hit", "parse_head"]
