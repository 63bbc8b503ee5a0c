"""Sending object bytes over HTTP: byte ranges, object headers, corking and ``sendfile``.

Shared by the owner process (:mod:`cache.server`) and the hit-serving worker processes
(:mod:`cache.worker`), so every process answers ``Range``, ``If-None-Match``, ``HEAD`` and
416 identically and sends files the same way. It imports nothing heavier than aiohttp:
a worker process starts quickly and never loads the blob store or the index.

Why the send path is shaped so (see :meth:`Sender.sendfile`): one non-blocking
``sendfile`` on the event loop first (it often moves a whole range with no thread hop),
the rest on a send thread, because on loopback and fast NICs the kernel's copy happens
in the sending thread and one event loop would otherwise cap a process at one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import select
import socket
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from aiohttp import web

from bdn.service import settle
from cache.errors import RangeNotSatisfiableError

# A client that accepts no byte for this long is dropped (frees its send thread).
SEND_STALL_TIMEOUT_S = 300.0
SEND_POLL_SLICE_S = 1.0
# The pipe a relayed body goes through (splice); the kernel may give less.
SPLICE_PIPE_BYTES = 1024 * 1024
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
IMMUTABLE = "public, max-age=31536000, immutable"
OCTET_STREAM = "application/octet-stream"
# Which process served a response (see cache.workers); the owner is worker 0.
WORKER_HEADER = "X-Bdn-Worker"
OWNER_WORKER = 0
# Digits of a Range offset past which it is "beyond any object" (10^18 B = 1 EB).
MAX_RANGE_DIGITS = 18
_PAST_ANY_END = 10 ** MAX_RANGE_DIGITS
_RANGE_SPEC_RE = re.compile(r"([0-9]*)[ \t]*-[ \t]*([0-9]*)", re.ASCII)
# One entity-tag of an If-None-Match list: (W/)"opaque".
_ETAG_RE = re.compile(r'(W/)?"([^"]*)"')


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The half-open byte range a ``Range`` header asks of an object of ``size`` bytes.

    None means "send the whole object": no header, a unit other than bytes, or several
    ranges (RFC 9110 lets a server ignore those). Raises
    :class:`RangeNotSatisfiableError` for a malformed bytes range or one that selects no
    byte (first byte at or past the end; a zero suffix; any range of an empty object).
    Only ASCII digits count (``str.isdigit`` also takes ``²`` and ``٣``, which ``int``
    refuses or reads), and a number too long to be a byte offset is read as "past any
    end", never parsed: a hostile header gets a 416 or a 200, never a 500.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    spec = spec.strip()
    if "," in spec:
        return None
    m = _RANGE_SPEC_RE.fullmatch(spec)
    if m is None:
        raise _unsatisfiable(header, size)
    first, last = m.group(1), m.group(2)
    if not first:
        if not last or _offset(last) == 0 or size == 0:
            raise _unsatisfiable(header, size)
        return max(0, size - _offset(last)), size
    start = _offset(first)
    if start >= size or (last and _offset(last) < start):
        raise _unsatisfiable(header, size)
    if not last:
        return start, size
    return start, min(_offset(last) + 1, size)


def _offset(digits: str) -> int:
    """A byte offset of ASCII digits; longer than ``MAX_RANGE_DIGITS`` (leading zeros
    aside): past the end of any object."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= MAX_RANGE_DIGITS else _PAST_ANY_END


def not_modified(if_none_match: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` (RFC 9110 §13.1.2) matches an object whose strong
    ``etag`` is this: ``*``, or any entity-tag of the list by weak comparison (``W/``
    ignored on either side). A malformed list matches nothing (the object is sent)."""
    if if_none_match is None:
        return False
    value = if_none_match.strip()
    if value == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(f'"{m.group(2)}"' == opaque for m in _ETAG_RE.finditer(value))


def range_if(range_header: str | None, if_range: str | None, etag: str) -> str | None:
    """The ``Range`` to apply given ``If-Range`` (RFC 9110 §13.1.5): the range only if
    ``If-Range`` is absent or strongly matches ``etag``; a date or another validator
    means "send it all" (None). Objects have no ``Last-Modified``, so no date matches."""
    if range_header is None or if_range is None:
        return range_header
    return range_header if if_range.strip() == etag else None


def _unsatisfiable(header: str, size: int) -> RangeNotSatisfiableError:
    return RangeNotSatisfiableError(f"range {header!r} not satisfiable for {size} bytes",
                                    size=size)


def object_headers(digest: str, content_type: str, state: str,
                   worker: str) -> dict[str, str]:
    """The headers of every object response (``digest`` as ``b3:<hex>``)."""
    return {"ETag": f'"{digest}"', "Cache-Control": IMMUTABLE, "Accept-Ranges": "bytes",
            "Content-Type": content_type, "X-Bdn-Cache": state, WORKER_HEADER: worker}


def range_refusal_body(error: RangeNotSatisfiableError, digest: str) -> str:
    """The JSON body of a 416 for object ``digest``."""
    return json.dumps({"error": f"{error} (object {digest})", "digest": digest})


def prepare_range(request: web.Request, digest: str, size: int,
                  headers: dict[str, str]) -> tuple[int, int, int] | web.Response:
    """(status, start, end) for the request's ``Range``, or the 416 response to send.

    Adds ``Content-Range`` to ``headers`` for a 206.
    """
    try:
        rng = parse_range(range_if(request.headers.get("Range"),
                                   request.headers.get("If-Range"), headers["ETag"]), size)
    except RangeNotSatisfiableError as e:
        headers["Content-Range"] = f"bytes */{size}"
        headers["Content-Type"] = "application/json"
        return web.Response(status=416, text=range_refusal_body(e, digest),
                            headers=headers)
    if rng is None:
        return 200, 0, size
    headers["Content-Range"] = f"bytes {rng[0]}-{rng[1] - 1}/{size}"
    return 206, rng[0], rng[1]


def abort(request: web.Request) -> None:
    """Drop the connection mid-body: the client sees a short, failed transfer, and the
    socket is never reused for a next request while the body is incomplete."""
    if request.transport is not None:
        request.transport.abort()


def cork(request: web.Request, want: bool) -> socket.socket | None:
    """Hold the headers back until the body joins them (``TCP_CORK``, as nginx's
    ``tcp_nopush``): one segment and one client wakeup instead of two per response —
    most of the per-request cost of small ranges on loopback."""
    if not want or not hasattr(socket, "TCP_CORK") or request.transport is None:
        return None
    sock = request.transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    except OSError:
        return None
    return sock  # type: ignore[no-any-return]


def uncork(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


def sendfile_blocking(sock_fd: int, file_fd: int, offset: int, count: int,
                      stop: threading.Event) -> None:
    """``sendfile`` until done on a non-blocking socket, waiting with ``poll`` (thread).

    Waits in slices so a server shutting down (``stop``) never waits on a stalled
    client; a client that takes no byte for ``SEND_STALL_TIMEOUT_S`` is dropped.
    """
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    sent = 0
    stalled_s = 0.0
    while sent < count:
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
        except BlockingIOError:
            if poller.poll(SEND_POLL_SLICE_S * 1000):
                stalled_s = 0.0
                continue
            stalled_s += SEND_POLL_SLICE_S
            if stop.is_set() or stalled_s >= SEND_STALL_TIMEOUT_S:
                raise ConnectionResetError(
                    "server stopping" if stop.is_set() else
                    f"client read nothing for {SEND_STALL_TIMEOUT_S:.0f} s") from None
            continue
        if n == 0:
            raise ConnectionResetError("file ended before the response did")
        sent += n


class Sender:
    """Sends file bytes on request connections, with ``threads`` send threads (0: all
    on the event loop). ``stop()`` makes sends to stalled clients end within
    ``SEND_POLL_SLICE_S`` (call it before aiohttp waits for in-flight requests)."""

    def __init__(self, threads: int) -> None:
        if threads < 0:
            raise ValueError("Sender.threads must be ≥ 0")
        self.threads = threads
        self.stopping = threading.Event()
        self._executor = (ThreadPoolExecutor(threads, thread_name_prefix="bdn-cache-send")
                          if threads else None)
        self._in_threads = 0

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.stopping.set()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def _raw_socket(self, request: web.Request) -> AsyncIterator[int | None]:
        """The request connection's socket fd, to write to directly while the
        transport's reading is paused and its buffer is empty (as asyncio's own
        ``loop.sendfile`` does); None if the transport offers no socket."""
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        sock = transport.get_extra_info("socket")
        if sock is None or not hasattr(transport, "_make_empty_waiter"):
            yield None
            return
        resume = transport.is_reading()
        transport.pause_reading()
        try:
            if transport.get_write_buffer_size():
                try:
                    await transport._make_empty_waiter()  # the headers are on the wire
                finally:
                    transport._reset_empty_waiter()
            yield sock.fileno()
        finally:
            if resume and not transport.is_closing():
                transport.resume_reading()

    async def sendfile(self, request: web.Request, f: BinaryIO, offset: int,
                       count: int) -> None:
        """Send ``count`` bytes of ``f`` from ``offset`` on the request's connection.

        First one non-blocking ``sendfile`` right here: it moves as much as the socket
        buffer takes (often a whole range) with no thread hop and no extra wakeup — the
        per-request cost that decides small ranges. What is left goes to a send thread:
        on loopback and fast NICs the kernel's copy and TCP work happen in the sending
        thread, so one event loop would cap the process at one core. The thread works
        on a ``dup`` of the socket (it can never write into a reused descriptor). With
        no send threads (or every one busy: slow readers hold them, and slow clients
        must never queue fast ones) the rest is sent on the loop (:meth:`_send_on_loop`).
        """
        loop = asyncio.get_running_loop()
        async with self._raw_socket(request) as sock_fd:
            if sock_fd is None:
                assert request.transport is not None
                await loop.sendfile(request.transport, f, offset, count)
                return
            try:
                sent = os.sendfile(sock_fd, f.fileno(), offset, count)
            except BlockingIOError:
                sent = 0
            offset += sent
            count -= sent
            if count <= 0:
                return
            if self._executor is None or self._in_threads >= self.threads:
                await self._send_on_loop(loop, sock_fd, f.fileno(), offset, count)
                return
            fd = os.dup(sock_fd)
            self._in_threads += 1
            try:
                await loop.run_in_executor(self._executor, sendfile_blocking, fd,
                                           f.fileno(), offset, count, self.stopping)
            finally:
                self._in_threads -= 1
                os.close(fd)

    async def _send_on_loop(self, loop: asyncio.AbstractEventLoop, sock_fd: int,
                            file_fd: int, offset: int, count: int) -> None:
        """``sendfile`` whenever the socket is writable, from the loop's selector.

        As lean as it gets (one callback and one ``sendfile`` per writable event; a
        ``dup`` of the socket so the transport's own registration is left alone): with
        one process per core (:mod:`cache.workers`) this costs less CPU per response
        than a thread hop, and much less than ``loop.sendfile``.
        """
        fd = os.dup(sock_fd)
        done: asyncio.Future[None] = loop.create_future()
        watch = _StallWatch(loop, self.stopping, done)
        pos, left = offset, count

        def on_writable() -> None:
            nonlocal pos, left
            try:
                n = os.sendfile(fd, file_fd, pos, left)
            except BlockingIOError:
                return
            except OSError as e:
                settle(done, ConnectionResetError(f"client went away: {e}"))
                return
            if n == 0:
                settle(done, ConnectionResetError("file ended before the response did"))
                return
            pos += n
            left -= n
            watch.progressed()
            if left <= 0:
                settle(done, None)

        loop.add_writer(fd, on_writable)
        try:
            await done
        finally:
            watch.cancel()
            loop.remove_writer(fd)
            os.close(fd)

    async def splice_from(self, request: web.Request, src_fd: int, count: int) -> bool:
        """Move the next ``count`` bytes arriving on socket ``src_fd`` to the request's
        connection through a pipe (``splice``: the bytes never enter this process).

        For relaying a large body from another local process: no copy through user
        space and one wakeup per pipe-full. False (nothing moved) if the connection
        offers no socket; raises :class:`ConnectionResetError` if either side ends
        first. Same stall and stop rules as sending a file.
        """
        loop = asyncio.get_running_loop()
        async with self._raw_socket(request) as sock_fd:
            if sock_fd is None:
                return False
            await self._splice_on_loop(loop, src_fd, sock_fd, count)
            return True

    async def _splice_on_loop(self, loop: asyncio.AbstractEventLoop, src_fd: int,
                              dst_fd: int, count: int) -> None:
        """Alternate: fill the pipe from ``src`` (wait for it only while the pipe is
        empty), drain it into ``dst`` (wait for it only while the pipe holds bytes), so
        a level-triggered wait never spins on a full pipe."""
        src, dst = os.dup(src_fd), os.dup(dst_fd)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, SPLICE_PIPE_BYTES)
        done: asyncio.Future[None] = loop.create_future()
        watch = _StallWatch(loop, self.stopping, done)
        in_pipe, left = 0, count
        waiting: int | None = None  # the fd registered for (src: read, dst: write)

        def wait_for(fd: int | None) -> None:
            nonlocal waiting
            if waiting == fd:
                return
            if waiting == src:
                loop.remove_reader(src)
            elif waiting == dst:
                loop.remove_writer(dst)
            if fd == src:
                loop.add_reader(src, pump)
            elif fd == dst:
                loop.add_writer(dst, pump)
            waiting = fd

        def pump() -> None:
            nonlocal in_pipe, left
            while not done.done():
                try:
                    if in_pipe == 0:
                        n = os.splice(src, w, left, flags=_SPLICE_FLAGS)
                        if n == 0:
                            settle(done, ConnectionResetError(
                                f"the body ended {left} bytes short"))
                            return
                        in_pipe = n
                    else:
                        n = os.splice(r, dst, in_pipe, flags=_SPLICE_FLAGS)
                        in_pipe -= n
                        left -= n
                        watch.progressed()
                        if left <= 0:
                            settle(done, None)
                            return
                except BlockingIOError:
                    wait_for(src if in_pipe == 0 else dst)
                    return
                except OSError as e:
                    settle(done, ConnectionResetError(f"relay broke off: {e}"))
                    return

        try:
            pump()
            await done
        finally:
            watch.cancel()
            wait_for(None)
            for fd in (src, dst, r, w):
                os.close(fd)


class _StallWatch:
    """Ends a transfer driven by the loop's selector (``done``) within
    ``SEND_POLL_SLICE_S`` of the server stopping, or after ``SEND_STALL_TIMEOUT_S``
    without progress."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stopping: threading.Event,
                 done: asyncio.Future[None]) -> None:
        self._loop = loop
        self._stopping = stopping
        self._done = done
        self._progress_at = loop.time()
        self._timer = loop.call_later(SEND_POLL_SLICE_S, self._check)

    def progressed(self) -> None:
        self._progress_at = self._loop.time()

    def _check(self) -> None:
        if self._done.done():
            return
        if self._stopping.is_set():
            settle(self._done, ConnectionResetError("server stopping"))
        elif self._loop.time() - self._progress_at >= SEND_STALL_TIMEOUT_S:
            settle(self._done, ConnectionResetError(
                f"client read nothing for {SEND_STALL_TIMEOUT_S:.0f} s"))
        else:
            self._timer = self._loop.call_later(SEND_POLL_SLICE_S, self._check)

    def cancel(self) -> None:
        self._timer.cancel()


async def send_file_response(request: web.Request, sender: Sender, f: BinaryIO,
                             status: int, start: int, end: int, headers: dict[str, str],
                             before_last_byte: Callable[[], None] | None = None,
                             ) -> tuple[web.StreamResponse, bool]:
    """Answer with bytes ``[start, end)`` of the open file ``f``; (response, whether the
    body went out whole). A client that goes away (or stalls) has its connection
    aborted, never reused.

    ``before_last_byte`` is called once all but the body's last byte went out (or
    before an empty body): whatever it tells others happens before the client can have
    its whole response.
    """
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = end - start
    send = request.method != "HEAD" and end > start
    corked = cork(request, send)
    try:
        await resp.prepare(request)
        if send and before_last_byte is not None:
            if end - start > 1:
                await sender.sendfile(request, f, start, end - start - 1)
            before_last_byte()
            await sender.sendfile(request, f, end - 1, 1)
        elif send:
            await sender.sendfile(request, f, start, end - start)
        elif before_last_byte is not None:
            before_last_byte()
    except ConnectionError:
        abort(request)
        return resp, False
    finally:
        uncork(corked)
    await resp.write_eof()
    return resp, True


__all__ = ["IMMUTABLE", "OCTET_STREAM", "OWNER_WORKER", "WORKER_HEADER", "Sender", "abort",
           "cork", "not_modified", "object_headers", "parse_range", "prepare_range",
           "range_if", "range_refusal_body", "send_file_response", "sendfile_blocking", "uncork"]
