"""Fetchers over fsspec filesystems: :func:`fsspec_fetcher` (ranged ``cat_file`` reads,
one per block) and :func:`loop_stream_fetcher` (one streamed response per range, read on
the filesystem's event loop and handed to the calling thread in blocks).

Sources that can send a plain HTTP request read on blocking sockets instead
(:mod:`bdn.transfer.http_range`), which costs less CPU per byte; these are for SDKs that
must sign or send the request themselves (S3 through aiobotocore) and for an unfamiliar
gcsfs.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

from bdn.transfer.files import Fetch
from bdn.transfer.options import STREAM_BLOCK_BYTES


def fsspec_fetcher(fs: Any, key: str, path: str, block_bytes: int,
                   classify: Callable[[BaseException, str, str], BaseException]) -> Fetch:
    """A :data:`Fetch` over an fsspec filesystem (s3fs, gcsfs): ranged ``cat_file`` reads
    of at most ``block_bytes``, failures mapped by ``classify(exc, where, path)``."""

    def fetch(start: int, end: int) -> Iterator[bytes]:
        pos = start
        while pos < end:
            stop = min(pos + block_bytes, end)
            try:
                block = fs.cat_file(key, start=pos, end=stop)
            except Exception as e:
                raise classify(e, f"reading {path}", path) from None
            if not block:
                return
            yield block
            pos += len(block)

    return fetch


class AsyncBody(Protocol):
    """A response body read on an event loop (aiobotocore's StreamingBody, or any
    response adapted): ``read(n)`` returns at most ``n`` bytes, ``b""`` at the end."""

    async def read(self, n: int) -> bytes: ...
    def close(self) -> None: ...


# Blocks a response may be read ahead of the thread consuming it.
READ_AHEAD_BLOCKS = 4


class _ConsumerGone(Exception):
    pass


_END = object()


class _Handoff:
    """Blocks from a coroutine on an event loop to one thread, at most ``depth`` ahead.

    Each side blocks only when it must (the thread on empty, the coroutine on full) and
    only then is it woken by the other, so a steady stream costs no cross-thread wake-up
    per block: on two shared cores those wake-ups (GIL hand-offs included) cost more than
    the hashing.
    """

    def __init__(self, loop: Any, depth: int) -> None:
        self.loop = loop
        self.depth = depth
        self.items: collections.deque[Any] = collections.deque()
        self.cond = threading.Condition()
        self.producer_wake: Any = None  # an asyncio.Event while the coroutine waits
        self.gone = False

    async def put(self, item: Any) -> None:
        import asyncio

        while True:
            with self.cond:
                if self.gone:
                    raise _ConsumerGone
                if len(self.items) < self.depth:
                    self.items.append(item)
                    self.cond.notify()
                    return
                self.producer_wake = wake = asyncio.Event()
            await wake.wait()

    def get(self) -> Any:
        with self.cond:
            while not self.items:
                self.cond.wait()
            item = self.items.popleft()
            wake, self.producer_wake = self.producer_wake, None
        if wake is not None:
            self.loop.call_soon_threadsafe(wake.set)
        return item

    def close(self) -> None:
        with self.cond:
            self.gone = True
            wake, self.producer_wake = self.producer_wake, None
        if wake is not None:
            self.loop.call_soon_threadsafe(wake.set)


def loop_stream_fetcher(loop: Any, open_body: Callable[[int, int], Awaitable[AsyncBody]],
                        classify: Callable[[BaseException], BaseException],
                        block_bytes: int = STREAM_BLOCK_BYTES) -> Fetch:
    """A :data:`Fetch` streaming one ranged response per call from an fsspec filesystem's
    event loop (s3fs: aiobotocore signs and sends the request), in blocks of about
    ``block_bytes``. Sources that can send a plain HTTP request read on blocking sockets
    instead (:mod:`bdn.transfer.http_range`), which costs less CPU per byte.

    One request per range, read as a stream: not one request per block (object stores
    bill and throttle per request, and some compatible servers read the whole object for
    every ranged GET), and not the whole range gathered in memory (a fresh large buffer
    costs a page fault per 4 KiB). A coroutine on the loop reads the response up to
    ``READ_AHEAD_BLOCKS`` blocks ahead of the calling thread (see :class:`_Handoff`), so
    the network keeps flowing while the caller hashes and writes. Failures are mapped by
    ``classify``.
    """
    import asyncio

    async def read_block(body: AsyncBody, n: int) -> tuple[bytes, Exception | None]:
        # aiohttp hands over whatever has arrived (often 64 KiB); gather a block so the
        # caller's per-block work (hash, write: GIL round trips) is paid per block. What
        # arrived before a failure is handed on too, so a resume loses nothing.
        pieces = []
        failure: Exception | None = None
        try:
            while n > 0:
                piece = await body.read(n)
                if not piece:
                    break
                pieces.append(piece)
                n -= len(piece)
        except Exception as e:
            failure = e
        return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), failure

    async def pump(start: int, end: int, handoff: _Handoff) -> None:
        body: AsyncBody | None = None
        try:
            body = await open_body(start, end)
            pos = start
            while pos < end:
                block, failure = await read_block(body, min(block_bytes, end - pos))
                if block:
                    await handoff.put(block)
                    pos += len(block)
                if failure is not None:
                    raise failure
                if not block:
                    break
            await handoff.put(_END)
        except _ConsumerGone:
            pass
        except Exception as e:
            with contextlib.suppress(_ConsumerGone):
                await handoff.put(e)
        finally:
            if body is not None:
                with contextlib.suppress(Exception):
                    body.close()

    def fetch(start: int, end: int) -> Iterator[bytes]:
        if start >= end:
            return
        handoff = _Handoff(loop, READ_AHEAD_BLOCKS)
        running = asyncio.run_coroutine_threadsafe(pump(start, end, handoff), loop)
        try:
            while True:
                item = handoff.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise classify(item) from None
                yield item
        finally:
            handoff.close()
            running.cancel()

    return fetch
