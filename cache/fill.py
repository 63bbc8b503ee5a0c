"""One read-through fill: an object copied from the blob store once, however many wait.

A :class:`Fill` is the single flight for one digest. Its producer runs on a worker thread
(the blob store is synchronous): it streams decoded blocks from the store, hashes them,
writes them into the disk store's partial file (or, for an object that cannot be kept,
into memory) and reports progress to the event loop after every block. Waiters are
served from what is already written, so the first byte does not wait for the whole
object.

The digest is only known to match at the very end. So a waiter never *finishes* a
response from an unverified fill: it sends everything but the last byte of its range,
and the last byte only once the fill is verified. If the fill fails (store error, digest
mismatch), the waiter aborts its connection: a client sees a broken transfer, never
corrupt bytes that look complete.

Background fills (prefetch) pass through a byte-rate limiter that a foreground waiter
lifts the moment it joins: a prefetch never slows down a read someone is waiting for.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from cache.disk import FillSlot
from manifests.digest import Digest, Hasher

# Progress granularity: a waiter can send at most this much behind the producer.
FILL_BLOCK_BYTES = 1024 * 1024
# A throttled producer re-checks whether it was promoted at least this often.
THROTTLE_SLICE_S = 0.05


class RateLimiter:
    """A token bucket in bytes/s shared by background fills (thread safe).

    ``acquire`` blocks the calling worker thread, never the event loop. ``burst_bytes``
    bounds how much may go at once after an idle spell.
    """

    def __init__(self, bytes_per_s: float, burst_bytes: int | None = None) -> None:
        if bytes_per_s <= 0:
            raise ValueError("RateLimiter.bytes_per_s must be > 0")
        self.rate = float(bytes_per_s)
        self.burst = float(burst_bytes if burst_bytes is not None
                           else max(FILL_BLOCK_BYTES, bytes_per_s / 10))
        self._tokens = self.burst
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self, n: int, still_throttled: Fill | None = None) -> None:
        """Take ``n`` bytes of budget, sleeping as needed; returns early if the fill
        passed as ``still_throttled`` is promoted to the foreground meanwhile."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
                self._at = now
                if self._tokens >= min(n, self.burst):
                    self._tokens -= n
                    return
                wait = (min(n, self.burst) - self._tokens) / self.rate
            if still_throttled is not None and (not still_throttled.background
                                                or still_throttled.cancelled):
                return
            time.sleep(min(wait, THROTTLE_SLICE_S))


class FillAborted(Exception):
    """The server is shutting down; the fill stops at the next block."""


class Fill:
    """The state of one fill, shared by its producer thread and its waiters.

    All fields are read and written on the event loop thread except ``background``
    and ``cancelled`` (plain flags the producer polls) and the partial file / memory
    blocks the producer appends to.
    """

    def __init__(self, digest: Digest, *, background: bool = False) -> None:
        self.digest = digest
        self.background = background
        self.cancelled = False
        self.size: int | None = None
        self.written = 0
        self.slot: FillSlot | None = None
        self.final_path: Path | None = None
        self.blocks: list[bytes] = []  # memory-backed fill (object not kept on disk)
        self.error: BaseException | None = None
        self.started_s = time.monotonic()
        self.size_known = asyncio.Event()
        self.done = asyncio.Event()
        self._progress = asyncio.Event()

    @property
    def ok(self) -> bool:
        return self.done.is_set() and self.error is None

    def promote(self) -> None:
        """A foreground request is waiting: stop throttling this fill."""
        self.background = False

    # -- loop side -----------------------------------------------------------------

    def set_size(self, size: int | None, slot: FillSlot | None) -> None:
        self.size = size
        self.slot = slot
        self.size_known.set()

    def advance(self, written: int) -> None:
        self.written = written
        self._wake()

    def finish(self, error: BaseException | None, final_path: Path | None = None) -> None:
        self.error = error
        self.final_path = final_path
        if self.size is None and error is None:
            self.size = self.written
        self.size_known.set()
        self.done.set()
        self._wake()

    def _wake(self) -> None:
        ev, self._progress = self._progress, asyncio.Event()
        ev.set()

    async def wait_progress(self) -> None:
        """Until the producer reports more bytes, or the fill ends."""
        if self.done.is_set():
            return
        await self._progress.wait()

    def iter_memory(self, start: int, end: int) -> Iterator[memoryview]:
        """Views of ``[start, end)`` from a memory-backed fill's blocks."""
        off = 0
        for block in list(self.blocks):
            b_end = off + len(block)
            if b_end > start and off < end:
                lo = max(start, off) - off
                hi = min(end, b_end) - off
                yield memoryview(block)[lo:hi]
            if b_end >= end:
                break
            off = b_end


def produce(fill: Fill, blocks: Iterator[bytes], fd: int | None,
            loop: asyncio.AbstractEventLoop, limiter: RateLimiter | None
            ) -> tuple[Digest, int]:
    """Copy ``blocks`` into the fill (worker thread).

    Returns the digest and length of everything read (so a mismatch can be reported).

    Stops early — returning the digest of the bytes so far — once more bytes arrive than
    the size the store announced, so a bad object never writes past its reservation.
    """
    hasher = Hasher()
    total = 0
    limit = fill.size
    for block in blocks:
        if fill.cancelled:
            raise FillAborted(f"fill of {fill.digest} stopped: server shutting down")
        if limiter is not None and fill.background:
            limiter.acquire(len(block), still_throttled=fill)
        if limit is not None and total + len(block) > limit:
            hasher.update(block)
            break
        hasher.update(block)
        if fd is not None:
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view):]
        else:
            fill.blocks.append(block)
        total += len(block)
        loop.call_soon_threadsafe(fill.advance, total)
    return hasher.digest(), hasher.length
