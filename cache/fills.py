"""Fill coordination: at most one store read per object, however many ask at once.

:class:`Fills` keeps the fills in flight by digest. A request for an object that is not
cached joins its fill if one runs (``coalesced``) or starts it (``miss``); a prefetch
starts a *background* fill, throttled by the shared byte-rate limiter until a
foreground request joins it (:mod:`cache.fill` holds one fill's producer and waiters).
A fill learns the object's size first (the store's stat; for a zstd object the frame
header), reserves that much of the disk budget, streams the decoded bytes into a partial
file while hashing them, and commits the file only when the bytes match their digest;
an object whose size is unknown up front is filled in memory and kept afterwards if it
fits. A digest the store lacks is remembered by the negative cache.

The store is read through a :class:`CountingBackend` so ``/metrics`` can show, from
outside the process, that concurrent misses cost one read. Store calls run on the
server's thread pool (the blob store is synchronous and may be remote); the event loop
only hands out bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import zstandard

from bdn.errors import NotFoundError
from bdn.store import OBJECTS_PREFIX, Backend, BlobStore, object_key
from cache.disk import DiskStore
from cache.edge import NegativeCache
from cache.errors import (
    CacheNotFoundError,
    FillError,
    FillIntegrityError,
    StoreUnavailableError,
)
from cache.fill import FILL_BLOCK_BYTES, Fill, FillAborted, RateLimiter, produce
from cache.metrics import Metrics
from manifests.digest import Digest
from manifests.manifest import ENCODING_RAW, ENCODING_ZSTD

log = logging.getLogger(__name__)

ZSTD_HEADER_PEEK_BYTES = 18


class CountingBackend:
    """The store backend, passed through, counting reads of objects (for ``/metrics``).

    Counting at the backend is counting at the store: every byte of an object the server
    reads comes through one of these calls, so "one read per object however many
    waiters" is observable from outside the process.
    """

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.url = inner.url
        self.object_reads = 0
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        if key.startswith(OBJECTS_PREFIX):
            with self._lock:
                self.object_reads += 1

    def size(self, key: str) -> int | None:
        return self.inner.size(key)

    def put(self, key: str, data: bytes | memoryview, *, fsync: bool = False) -> bool:
        return self.inner.put(key, data, fsync=fsync)

    def get(self, key: str) -> bytes:
        self._count(key)
        return self.inner.get(key)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        self._count(key)
        return self.inner.get_range(key, start, end)

    def open(self, key: str) -> BinaryIO:
        self._count(key)
        return self.inner.open(key)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def _store_failed(store: BlobStore, doing: str, digest: Digest,
                  e: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"blob store {store.url} {doing} {digest}: {type(e).__name__}: {e}",
        digest=str(digest), url=store.url)


class Fills:
    """The fills in flight, by digest; ``store`` reads through ``backend``."""

    def __init__(self, store: BlobStore, backend: CountingBackend, disk: DiskStore,
                 metrics: Metrics, negative: NegativeCache, executor: ThreadPoolExecutor,
                 limiter: RateLimiter) -> None:
        self.store = store
        self.backend = backend
        self.disk = disk
        self.metrics = metrics
        self.negative = negative
        self.in_flight: dict[Digest, Fill] = {}
        self._executor = executor
        self._limiter = limiter
        self._tasks: set[asyncio.Task[None]] = set()

    def __contains__(self, digest: Digest) -> bool:
        return digest in self.in_flight

    def __len__(self) -> int:
        return len(self.in_flight)

    def join(self, digest: Digest, *, background: bool = False) -> tuple[Fill, str]:
        """The fill of ``digest``: joined if one is in flight, started otherwise."""
        fill = self.in_flight.get(digest)
        if fill is not None:
            if not background:
                fill.promote()
                self.metrics.coalesced += 1
            return fill, "coalesced"
        fill = Fill(digest, background=background)
        self.in_flight[digest] = fill
        if not background:
            self.metrics.misses += 1
        task = asyncio.create_task(self._run(fill))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fill, "miss"

    async def ensure(self, digest: Digest, *, background: bool = False
                     ) -> str | Path | None:
        """Have ``digest`` cached (fill it if needed); its path, or None if not kept."""
        path = self.disk.lookup(digest)
        if path is not None:
            return path
        fill, _ = self.join(digest, background=background)
        await fill.done.wait()
        if fill.error is not None:
            raise fill.error
        return fill.final_path

    async def stop(self, timeout_s: float) -> None:
        """Tell every fill to stop and wait up to ``timeout_s`` for them to end."""
        for fill in self.in_flight.values():
            fill.cancelled = True
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout_s)

    async def _run(self, fill: Fill) -> None:
        loop = asyncio.get_running_loop()
        digest = fill.digest
        store = self.store
        slot = None
        try:
            try:
                info = await loop.run_in_executor(self._executor, store.stat_object, digest)
            except Exception as e:
                raise _store_failed(store, "unavailable while looking up", digest, e) from e
            if info is None:
                raise CacheNotFoundError(f"object {digest} not found in blob store "
                                         f"{store.url}", digest=str(digest), url=store.url)
            if info.encoding == ENCODING_RAW:
                size: int | None = info.stored_length
            else:
                size = await loop.run_in_executor(self._executor, self._zstd_size, digest)
            if size is not None:
                slot = self.disk.begin_fill(digest, size)
            fill.set_size(size, slot)

            def run() -> tuple[Digest, int]:
                try:
                    blocks = store.iter_object(digest, FILL_BLOCK_BYTES, info=info)
                    return produce(fill, blocks, slot.fd if slot else None, loop,
                                   self._limiter)
                except (FillAborted, NotFoundError):
                    raise
                except Exception as e:
                    raise _store_failed(store, "failed while reading", digest, e) from e

            got, length = await loop.run_in_executor(self._executor, run)
            if got != digest or (size is not None and length != size):
                raise FillIntegrityError(
                    f"object {digest} in blob store {store.url} does not match its digest "
                    f"(read {length} bytes hashing to {got}); not cached",
                    digest=str(digest), url=store.url)
            if slot is not None:
                final: Path | None = self.disk.commit_fill(slot)
            else:
                final = await self._keep_memory_fill(fill, length)
            self.metrics.bytes_filled += length
            self.metrics.observe_fill(time.monotonic() - fill.started_s)
            if fill.background:
                self.metrics.prefetch_filled += 1
            fill.finish(None, final)
        except BaseException as e:
            if slot is not None:
                self.disk.abort_fill(slot)
            fill.blocks.clear()
            reason = ("integrity" if isinstance(e, FillIntegrityError) else
                      "not_found" if isinstance(e, NotFoundError) else
                      "store" if isinstance(e, StoreUnavailableError) else "other")
            self.metrics.fail(reason)
            if reason == "not_found":
                self.negative.add(digest, time.monotonic())
            else:
                log.warning("fill of %s failed: %s", digest, e)
            fill.finish(e if isinstance(e, Exception) else FillError(
                f"fill of {digest} stopped", digest=str(digest)))
            if not isinstance(e, Exception):
                raise
        finally:
            if self.in_flight.get(digest) is fill:
                del self.in_flight[digest]

    def _zstd_size(self, digest: Digest) -> int | None:
        """The decoded size a zstd object's frame header announces, if it does.

        A header peek (18 bytes), not a body read, so it goes past the read counter.
        """
        key = object_key(digest, ENCODING_ZSTD)
        try:
            header = self.backend.inner.get_range(key, 0, ZSTD_HEADER_PEEK_BYTES)
            size = zstandard.frame_content_size(header)
        except (zstandard.ZstdError, OSError, NotFoundError):
            return None
        return size if size >= 0 else None

    async def _keep_memory_fill(self, fill: Fill, length: int) -> Path | None:
        """Store a verified fill that ran in memory (size unknown up front), if it fits."""
        slot = self.disk.begin_fill(fill.digest, length)
        if slot is None:
            return None

        def write() -> None:
            assert slot is not None
            for block in fill.blocks:
                view = memoryview(block)
                while view:
                    view = view[os.write(slot.fd, view):]

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, write)
        except OSError as e:
            self.disk.abort_fill(slot)
            log.warning("could not keep %s on disk: %s", fill.digest, e)
            return None
        return self.disk.commit_fill(slot)
