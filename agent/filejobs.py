"""File jobs: each file digest written into the node cache once, each chunk fetched once.

What must be shared node-wide for the bytes of a pull, owned by one :class:`FileJobs`
per agent:

* one :class:`FileJob` per file digest being written — two pulls that need the same
  file wait on the same job, so they fetch its chunks once;
* one in-flight future per chunk digest — two files that share a chunk fetch it once,
  the second copies it locally when the first has it verified on disk;
* the fetch thread pool (its size is the connection cap), the receive buffers, and the
  bytes-in-flight cap (:class:`ByteSemaphore`);
* the accounting of every answer a fetch got (the ``counters``), and the reports of a
  peer's bad bytes to that peer.

A job announces its partial file and each verified chunk to its listeners (the engine
turns them into a pull's events), and resolves its future with the published path.
Pulls, mounts and events are not known here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import xxhash

from agent.errors import FetchError, PullError
from agent.fetch import BufferPool, Fetcher, FetchResult
from agent.fetchpolicy import (
    BAD_BYTES,
    BUSY,
    CORRUPT,
    ERROR,
    MISSING,
    STORE,
    TIMEOUT,
    TRUNCATED,
    UNCACHED,
    Answer,
)
from agent.options import AgentOptions
from agent.planner import ChunkTask, FilePlan
from agent.writer import FileWriter
from bdn.store import BlobStore
from cache.client import RingClient
from cache.node import ChunkLocation, NodeCache, now_s
from cache.suspicion import Suspicion
from manifests.digest import Digest
from manifests.manifest import Chunk

log = logging.getLogger(__name__)

# A fetch thread waits this long for its report of a peer's bad bytes to be answered
# before asking again (so the cache drops its bad copy first); past it, it asks anyway.
REPORT_WAIT_S = 5.0
# The agent counter each kind of failed answer is counted in (bdn_agent_<name>_total).
ANSWER_COUNTERS = {CORRUPT: "integrity_failures", TRUNCATED: "truncated_answers",
                   BUSY: "busy_answers", ERROR: "error_answers", MISSING: "missing_answers",
                   TIMEOUT: "timeout_answers", UNCACHED: "uncached_answers"}

ChunkListener = Callable[[Chunk, str], None]
Io = Callable[..., Awaitable[Any]]


class FileJob:
    """Writes one file digest into the node cache; shared by every pull that needs it."""

    def __init__(self, jobs: FileJobs, plan: FilePlan) -> None:
        self.jobs = jobs
        self.plan = plan
        self.entry = plan.entry
        self.key = plan.digest
        self.listeners: list[ChunkListener] = []
        self.start_listeners: list[Callable[[str], None]] = []
        self.verified: list[tuple[Chunk, str]] = []
        self.partial_path: str | None = None
        self.published_path: str | None = None
        self.issued = asyncio.Event()
        self.future: asyncio.Future[Path] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._run(), name=f"file {plan.entry.digest.short}")

    @property
    def disk_path(self) -> str | None:
        """Where the file's verified bytes can be read now (same inode either way)."""
        return self.published_path or self.partial_path

    def subscribe(self, on_chunk: ChunkListener, on_start: Callable[[str], None]) -> None:
        if self.disk_path is not None:
            on_start(self.disk_path)
        for chunk, tier in self.verified:
            on_chunk(chunk, tier)
        self.listeners.append(on_chunk)
        self.start_listeners.append(on_start)

    def _verified(self, chunk: Chunk, tier: str) -> None:
        self.verified.append((chunk, tier))
        self.jobs.counters[f"bytes_{tier}"] += chunk.length
        self.jobs.on_held(chunk.digest)
        for fn in list(self.listeners):
            fn(chunk, tier)

    async def _run(self) -> None:
        jobs = self.jobs
        writer: FileWriter | None = None
        try:
            writer = await jobs.io(FileWriter.open, jobs.node, self.entry, now_s())
            self.partial_path = writer.partial_path
            for fn in list(self.start_listeners):
                fn(writer.partial_path)
            tasks: list[asyncio.Task[None]] = []
            plan_tasks = list(self.plan.tasks)
            if jobs.options.peer_advertise:
                plan_tasks = spread_for_sharing(plan_tasks, jobs.options.peer_advertise)
            for t in plan_tasks:
                if t.source == "done":
                    if writer.resumed and await jobs.io(writer.check_on_disk, t.chunk):
                        self._verified(t.chunk, "node")
                        continue
                    t = ChunkTask(t.chunk, "network")
                if t.source in ("network", "dup"):
                    # Acquire in plan order: requests go out in the order a loader reads.
                    await jobs.bytes_in_flight.acquire(t.chunk.length)
                tasks.append(asyncio.create_task(self._chunk(writer, t)))
            self.issued.set()
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            path = await jobs.io(writer.publish, now_s(),
                                 verify_file=jobs.options.verify_files)
            self.published_path = str(path)
            self.future.set_result(path)
        except BaseException as e:
            self.issued.set()
            if writer is not None:
                writer.close()
            if not self.future.done():
                self.future.set_exception(e if isinstance(e, Exception) else PullError(
                    f"writing {self.entry.path} was cancelled"))
                self.future.exception()  # retrieved here; waiters still receive it
            if not isinstance(e, Exception):
                raise
        finally:
            jobs.running.pop(self.key, None)

    async def _chunk(self, writer: FileWriter, t: ChunkTask) -> None:
        jobs = self.jobs
        chunk = t.chunk
        holds = t.source in ("network", "dup")
        try:
            if t.source == "local" and t.location is not None:
                if await jobs.io(writer.copy_local, chunk, t.location):
                    self._verified(chunk, "node")
                    return
            tier = await jobs.obtain(writer, chunk, holds_bytes=holds)
            holds = False  # obtain() released it
            self._verified(chunk, tier)
        finally:
            if holds:
                jobs.bytes_in_flight.release(chunk.length)


class ByteSemaphore:
    """An asyncio cap on bytes (not counts), first come first served.

    FIFO matters: requests are acquired in plan order, and a large chunk must not be
    starved by smaller ones behind it. A request above the capacity waits for all of it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.available = capacity
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = (
            collections.deque())

    async def acquire(self, n: int) -> None:
        n = min(n, self.capacity)
        if not self._waiters and self.available >= n:
            self.available -= n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(n)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove((n, fut))
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.available = min(self.capacity, self.available + min(n, self.capacity))
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.available >= self._waiters[0][0]:
            n, fut = self._waiters.popleft()
            if fut.done():
                continue
            self.available -= n
            fut.set_result(None)


def spread_for_sharing(tasks: list[ChunkTask], me: str) -> list[ChunkTask]:
    """The file's chunk tasks rotated to start at a point that depends on this agent.

    With node-to-node sharing, N agents pulling one model at once in the same (loader)
    order would all ask for the same chunk at the same moment, before anyone holds it,
    so nobody could serve anybody. Starting each agent at its own offset (xxh3 of its
    URL) makes them fetch different chunks first and hold what the others need next
    (BitTorrent's "rarest first", approximated without a swarm view). The cost: the
    loader's order is no longer the fetch order, so readiness events arrive later for
    the first tensors. Pure.
    """
    if len(tasks) < 2:
        return tasks
    start = xxhash.xxh3_64_intdigest(me.encode()) % len(tasks)
    return tasks[start:] + tasks[:start]


class FileJobs:
    """The node-wide file jobs and chunk fetches of one agent; see the module docstring.

    ``counters`` is the agent's counter dict (shared with the engine's metrics and the
    peer server), ``io`` runs a blocking call on the agent's local I/O pool, and
    ``on_held`` is told of every chunk verified into the node cache. Create inside a
    running loop.
    """

    def __init__(self, options: AgentOptions, node: NodeCache, store: BlobStore | None, *,
                 ring: RingClient | None, suspicion: Suspicion, counters: dict[str, int],
                 io: Io, on_held: Callable[[Digest], None]) -> None:
        self.options = options
        self.node = node
        self.ring = ring
        self.counters = counters
        self.io = io
        self.on_held = on_held
        self._loop = asyncio.get_running_loop()
        owners = ring.owners if ring is not None else None
        self.fetcher = Fetcher(options, store, owners=owners,
                               on_answer=self._answered, suspicion=suspicion)
        self.net_pool = ThreadPoolExecutor(options.max_connections,
                                           thread_name_prefix="bdn-fetch")
        self.buffers = BufferPool(options.max_bytes_in_flight)
        self.bytes_in_flight = ByteSemaphore(options.max_bytes_in_flight)
        self.running: dict[Digest, FileJob] = {}
        self.inflight: dict[Digest, asyncio.Future[ChunkLocation]] = {}

    def job(self, plan: FilePlan) -> FileJob:
        """The job writing ``plan``'s file: the running one, or a new one."""
        job = self.running.get(plan.digest)
        if job is None:
            job = self.running[plan.digest] = FileJob(self, plan)
        return job

    def cancel(self) -> None:
        """Cancel every running job (the agent is stopping)."""
        for job in list(self.running.values()):
            job.task.cancel()

    def close(self) -> None:
        """Stop fetching: chunks waiting out a backoff give up, the fetch threads end."""
        self.fetcher.close()

    def shutdown_pool(self) -> None:
        self.net_pool.shutdown(wait=True, cancel_futures=True)

    async def obtain(self, writer: FileWriter, chunk: Chunk, *, holds_bytes: bool) -> str:
        """Put ``chunk`` into ``writer``'s file, fetching it at most once node-wide.

        Returns the tier the bytes came from. Releases ``holds_bytes`` when done.
        """
        released = not holds_bytes

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.bytes_in_flight.release(chunk.length)

        try:
            other = self.inflight.get(chunk.digest)
            if other is not None:
                release()
                with contextlib.suppress(Exception):
                    loc = await asyncio.shield(other)
                    if await self.io(writer.copy_local, chunk, loc):
                        self.counters["chunks_copied_locally"] += 1
                        return "node"
            loc = self.node.chunk_location(chunk.digest)
            if loc is not None and not (loc.partial and loc.file_hex == writer.key.hex
                                        and loc.offset == chunk.offset):
                release()
                if await self.io(writer.copy_local, chunk, loc):
                    self.counters["chunks_copied_locally"] += 1
                    return "node"
            if released:
                await self.bytes_in_flight.acquire(chunk.length)
                released = False
            fut: asyncio.Future[ChunkLocation] = asyncio.get_running_loop().create_future()
            self.inflight[chunk.digest] = fut
            try:
                loop = asyncio.get_running_loop()
                result: FetchResult = await loop.run_in_executor(
                    self.net_pool, self._fetch_and_write, writer, chunk)
            except BaseException as e:
                if isinstance(e, FetchError):
                    self.counters["chunks_failed"] += 1
                fut.set_exception(e if isinstance(e, Exception) else PullError("cancelled"))
                fut.exception()  # retrieved: waiters fall back on their own
                raise
            finally:
                if self.inflight.get(chunk.digest) is fut:
                    del self.inflight[chunk.digest]
            fut.set_result(ChunkLocation(writer.key.hex, chunk.offset, chunk.length,
                                         partial=True))
            self.counters["chunks_fetched"] += 1
            return result.tier
        finally:
            release()

    def _fetch_and_write(self, writer: FileWriter, chunk: Chunk) -> FetchResult:
        # The buffer is taken on the worker thread, so at most one per connection is
        # live: memory is threads × chunk size, not the bytes-in-flight cap.
        buf = self.buffers.get(chunk.length)
        view = memoryview(buf)
        try:
            result = self.fetcher.fetch_into(chunk, view)
            writer.write_verified(chunk, view)
            return result
        finally:
            view.release()
            self.buffers.put(buf)

    def _answered(self, chunk: Chunk, answer: Answer, retry: bool) -> None:
        """On a fetch thread, after every answer for a chunk, strict or not.

        Counts it (on the loop: counters are not shared with threads), and reports a
        peer's corrupt or truncated bytes to that peer, waiting (bounded) for the report
        to be answered so the cache has dropped its bad copy before the chunk is asked
        again — of this peer or the next.
        """
        try:
            self._loop.call_soon_threadsafe(self._count_answer, answer, retry)
            if answer.outcome in BAD_BYTES and answer.source != STORE:
                report = asyncio.run_coroutine_threadsafe(
                    self.report_bad(chunk.digest, answer.source), self._loop)
                # A slow or failed report must not hold the chunk up past the wait,
                # nor an agent that is stopping (its loop may be blocked in close()).
                with contextlib.suppress(Exception):
                    report.result(timeout=0 if self.fetcher.closing else REPORT_WAIT_S)
        except RuntimeError:
            pass  # the loop is closed: the agent is stopping and the chunk is abandoned

    def _count_answer(self, answer: Answer, retry: bool) -> None:
        if retry:
            self.counters["chunk_retries"] += 1
        name = ANSWER_COUNTERS.get(answer.outcome)
        if name is not None:
            self.counters[name] += 1

    async def report_bad(self, digest: Digest, peer: str) -> None:
        """Tell the cluster cache that ``peer`` served bytes that did not verify."""
        self.counters["bad_reports"] += 1
        log.warning("cache peer %s served bad bytes for %s; reported", peer, digest)
        if self.ring is not None:
            with contextlib.suppress(Exception):
                await self.ring.report_bad(digest, peer)
