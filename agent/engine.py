"""The pull engine: resolves requests, plans, fetches and writes, publishes, mounts.

One :class:`Engine` per agent process (the daemon's, or an in-process one for a
standalone ``bdn pull``). It owns what must be shared node-wide:

* the node cache (``cache/node.py``) and its budget reservations;
* one :class:`FileJob` per file digest being written — two pulls that need the same
  file wait on the same job, so they fetch its chunks once;
* one in-flight future per chunk digest — two files that share a chunk fetch it once,
  the second copies it locally when the first has it verified on disk;
* the fetch thread pool (its size is the connection cap) and the bytes-in-flight cap.

A :class:`Pull` is the unit the API sees: its request, state, counters by tier, and an
append-only event list that subscribers replay from the start (so a loader connecting
late misses nothing). Pull records are persisted in the node cache's LMDB, so a
restarted agent resumes unfinished pulls by itself, and a client re-posting with the
same ``Idempotency-Key`` gets the same pull.

Mounts are shared: replicas of one deployment name the same mount. Every live pull
(queued, running or done) holds a reference on each path it names there — the pull
records *are* the reference counts, so they survive a restart — and each mount has a
persisted ledger of what this agent created in it (``agent.mounts.MountLedger``).
Releasing or failing a pull removes only ledger entries no other live pull names;
linking, sealing and removing in one mount run under that mount's lock.

Events (newline-delimited JSON on ``/v1/pulls/{id}/events``), in this order per file::

    {"event": "plan", "files": [{"path", "mount", "size", "digest"}], "bytes": N, ...}
    {"event": "file_start", "path", "mount", "size", "partial_path", "disk_path"}
    {"event": "chunk", "path", "mount", "offset", "length", "size", "tier",
     "disk_path"}                         # bytes verified on disk in disk_path
    {"event": "file", "path", "mount", "digest", "size"}   # published in the mount
    {"event": "done"} | {"event": "error", "message": ...}

Before its ``file`` event a file is readable only through ``disk_path`` (the partial
file in the node cache, opened read-only); ``chunk`` events say which ranges of it are
verified. When complete, the file is *linked* (not renamed) into the node cache's store,
so the partial path stays valid — same inode, now complete — until the file is evicted
or the agent restarts: a loader may open it late. Events sent after publication carry
the store path. After ``file``, the file is at ``mount/path``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from agent import mounts as mountlib
from agent.errors import (
    DiskFullError,
    FetchError,
    IdempotencyConflict,
    PullError,
    RequestError,
)
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
from agent.planner import ChunkTask, FilePlan, PlanOptions, PullPlan, PullTarget, plan_pull
from agent.resolve import entry_target, select_files
from agent.writer import FileWriter
from bdn import metrics as prom
from bdn.config import parse_weights
from bdn.errors import BdnError, ConfigError
from bdn.store import BlobStore
from cache.client import RingClient, RingClientOptions
from cache.node import ChunkLocation, NodeCache, content_key, now_s
from cache.suspicion import Suspicion
from manifests.digest import Digest
from manifests.manifest import Chunk, FileEntry, Manifest, parse_manifest
from manifests.refs import Ref

log = logging.getLogger(__name__)

TIERS = ("node", "peer", "cluster", "store")
TERMINAL_STATES = ("done", "failed", "released")
LOCAL_IO_THREADS = 4
PULL_KEY_PREFIX = "pull/"
IDEM_KEY_PREFIX = "idem/"
MOUNT_KEY_PREFIX = "mount/"
# States in which a pull holds its mounts (a reference on every path it names).
LIVE_STATES = ("queued", "running", "done")
MAX_IDEMPOTENCY_KEY_CHARS = 255
PEER_REFRESH_S = 5.0
# Verified chunks are announced to their owning pods in batches this often (sharing on).
HOLDERS_ANNOUNCE_S = 0.2
# Chunks still being received are announced again this often, so their short-lived
# "receiving" records (cache/tracker.py RECEIVING_TTL_S, 5 s) outlive a long receive.
RECEIVING_RENEW_S = 2.0
# A fetch thread waits this long for its report of a peer's bad bytes to be answered
# before asking again (so the cache drops its bad copy first); past it, it asks anyway.
REPORT_WAIT_S = 5.0
# The agent counter each kind of failed answer is counted in (bdn_agent_<name>_total).
ANSWER_COUNTERS = {CORRUPT: "integrity_failures", TRUNCATED: "truncated_answers",
                   BUSY: "busy_answers", ERROR: "error_answers", MISSING: "missing_answers",
                   TIMEOUT: "timeout_answers", UNCACHED: "uncached_answers"}


# HELP of each agent counter (``counters[name]`` → ``bdn_agent_<name>_total``; the
# ``bytes_<tier>`` counters are one family, ``bdn_agent_delivered_bytes_total{tier}``).
COUNTER_HELP = {
    "chunks_fetched": "Chunks fetched over the network and verified.",
    "chunks_copied_locally": "Chunks copied from another file in the node cache.",
    "bad_reports": "Bad copies reported to the cache pod or peer that served them.",
    "chunk_retries": "Chunk fetches retried after a failed answer.",
    "chunks_failed": "Chunks that failed after every source and retry.",
    "integrity_failures": "Answers whose bytes did not match their digest.",
    "truncated_answers": "Answers that ended before the chunk's last byte.",
    "busy_answers": "Answers asking to come back later (429/503 with Retry-After).",
    "error_answers": "Transport failures and answers with another HTTP status.",
    "missing_answers": "Answers saying the source lacks the chunk (404/410).",
    "timeout_answers": "Sources that gave no connection, first byte or progress in time.",
    "uncached_answers": "Only-if-cached asks answered 504 (the pod lacked the chunk).",
    "pulls_started": "Pulls started.",
    "pulls_done": "Pulls that finished.",
    "pulls_failed": "Pulls that failed.",
    "peer_uploads": "Chunks served to peer agents.",
    "peer_upload_bytes": "Bytes served to peer agents.",
    "peer_busy_answers": "Peer requests refused as busy.",
    "peer_missing_answers": "Peer requests for chunks this node does not hold.",
    "peer_copies_dropped": "Held chunks dropped after a re-hash showed them bad.",
    "peer_receiving_waits": "Peer requests that waited for a chunk still being received.",
    "peer_uploads_after_wait": "Chunks served to peers after waiting for their receive.",
}
# Node cache stats (``NodeCache.stats()``) → metric name and HELP; units end the name.
NODE_CACHE_GAUGES = {
    "files": ("bdn_node_cache_files", "Complete files in the node cache."),
    "partial_files": ("bdn_node_cache_partial_files", "Files still being written."),
    "bytes_used": ("bdn_node_cache_used_bytes", "Bytes of files in the node cache."),
    "bytes_pinned": ("bdn_node_cache_pinned_bytes", "Bytes of files pinned by mounts."),
    "budget_bytes": ("bdn_node_cache_budget_bytes", "The node cache's byte budget."),
}


# -- requests ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetSpec:
    """One thing to pull: a ref or manifest digest, optional patterns, optional mount."""

    name: str
    mount: str | None
    allow: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class PullRequest:
    targets: tuple[TargetSpec, ...]
    order: str = "loader"

    def canonical(self) -> dict[str, Any]:
        return {"order": self.order, "targets": [
            {"name": t.name, "mount": t.mount, "allow": list(t.allow),
             "ignore": list(t.ignore)} for t in self.targets]}

    @classmethod
    def from_canonical(cls, doc: dict[str, Any]) -> PullRequest:
        return cls(tuple(TargetSpec(t["name"], t["mount"], tuple(t["allow"]),
                                    tuple(t["ignore"])) for t in doc["targets"]),
                   order=doc.get("order", "loader"))


def parse_request(doc: Any) -> PullRequest:
    """Validate a ``POST /v1/pulls`` body (see the daemon's docstring for its shape)."""
    if not isinstance(doc, dict):
        raise RequestError("the request body must be a JSON object")
    known = {"ref", "mount", "weights", "mount_root", "prewarm", "order"}
    unknown = set(doc) - known
    if unknown:
        raise RequestError(f"unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    prewarm = bool(doc.get("prewarm", False))
    order = doc.get("order", "loader")
    if order not in ("loader", "path"):
        raise RequestError(f"order must be 'loader' or 'path', got {order!r}")
    has_ref, has_weights = doc.get("ref") is not None, doc.get("weights") is not None
    if has_ref == has_weights:
        raise RequestError("give exactly one of 'ref' (a ref or manifest digest) or "
                           "'weights' (entries as in config.yaml)")
    if has_ref:
        name = doc["ref"]
        if not isinstance(name, str):
            raise RequestError("ref must be a string: namespace/model[:tag] or b3:<hex>")
        try:
            name = str(Digest.parse(name)) if name.startswith("b3:") else str(Ref.parse(name))
        except BdnError as e:
            raise RequestError(str(e)) from None
        mount = doc.get("mount")
        if mount is not None:
            mount = str(mountlib.check_mount_path(mount, field="mount"))
        return PullRequest((TargetSpec(name, None if prewarm else mount),), order=order)
    items = doc["weights"]
    if not isinstance(items, list) or not items:
        raise RequestError("weights must be a non-empty list of entries")
    explicit: list[str | None] = []
    stripped = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError(f"weights[{i}] must be a mapping")
        item = dict(item)
        ref = item.pop("ref", None)
        if ref is not None and not isinstance(ref, str):
            raise RequestError(f"weights[{i}].ref must be a string")
        explicit.append(ref)
        stripped.append(item)
    try:
        entries = parse_weights(stripped)
    except ConfigError as e:
        raise RequestError(str(e)) from None
    root = doc.get("mount_root")
    if root is not None:
        root = str(mountlib.check_mount_path(root, field="mount_root"))
    targets = []
    for i, (entry, ref) in enumerate(zip(entries, explicit, strict=True)):
        try:
            name = entry_target(entry, ref)
        except BdnError as e:
            raise RequestError(str(e)) from None
        mount = None if prewarm else (
            os.path.join(root, entry.mount_location.lstrip("/")) if root
            else entry.mount_location)
        if mount is not None:
            mount = str(mountlib.check_mount_path(
                mount, field=f"weights[{i}].mount_location"))
        targets.append(TargetSpec(name, mount, entry.allow_patterns, entry.ignore_patterns))
    return PullRequest(tuple(targets), order=order)


# -- a pull -----------------------------------------------------------------------------

@dataclass
class Pull:
    id: str
    request: PullRequest
    key: str | None = None
    state: str = "queued"
    error: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    bytes_by_tier: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    bytes_total: int = 0
    bytes_done: int = 0
    files_total: int = 0
    files_done: int = 0
    started: float = 0.0
    finished: float | None = None
    manifests: list[str] = field(default_factory=list)
    mounts: dict[str, list[str]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # file digests pinned by this pull
    owner_uid: int | None = None  # who created it (unix socket peer), when known
    task: asyncio.Task[None] | None = None
    closed: bool = False  # the agent is shutting down: followers stop
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        """Every event from the first, then live ones, until ``done`` or ``error``."""
        i = 0
        while True:
            waiter = self._changed
            while i < len(self.events):
                ev = self.events[i]
                i += 1
                yield ev
                if ev.get("event") in ("done", "error"):
                    return
            if (self.state in TERMINAL_STATES or self.closed) and i >= len(self.events):
                return
            await waiter.wait()

    def status(self) -> dict[str, Any]:
        end = self.finished or time.monotonic()
        elapsed = max(1e-9, end - self.started) if self.started else 0.0
        moved = sum(self.bytes_by_tier.values())
        rate = moved / elapsed if elapsed else 0.0
        left = max(0, self.bytes_total - self.bytes_done)
        return {"id": self.id, "state": self.state, "error": self.error,
                "files_total": self.files_total, "files_done": self.files_done,
                "bytes_total": self.bytes_total, "bytes_done": self.bytes_done,
                "bytes_by_tier": dict(self.bytes_by_tier),
                "elapsed_s": round(elapsed, 3), "throughput_bps": round(rate),
                "eta_s": (round(left / rate, 3) if rate and self.state == "running"
                          else (0.0 if self.state == "done" else None)),
                "manifests": list(self.manifests), "mounts": sorted(self.mounts),
                "idempotency_key": self.key}

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key, "request": self.request.canonical(),
                "state": self.state, "error": self.error, "mounts": self.mounts,
                "files": self.files, "owner_uid": self.owner_uid}


ChunkListener = Callable[[Chunk, str], None]


class FileJob:
    """Writes one file digest into the node cache; shared by every pull that needs it."""

    def __init__(self, engine: Engine, plan: FilePlan) -> None:
        self.engine = engine
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
        self.engine.counters[f"bytes_{tier}"] += chunk.length
        self.engine.note_held(chunk.digest)
        for fn in list(self.listeners):
            fn(chunk, tier)

    async def _run(self) -> None:
        eng = self.engine
        writer: FileWriter | None = None
        try:
            writer = await eng.io(FileWriter.open, eng.node, self.entry, now_s())
            self.partial_path = writer.partial_path
            for fn in list(self.start_listeners):
                fn(writer.partial_path)
            tasks: list[asyncio.Task[None]] = []
            plan_tasks = list(self.plan.tasks)
            if eng.options.peer_advertise:
                plan_tasks = spread_for_sharing(plan_tasks, eng.options.peer_advertise)
            for t in plan_tasks:
                if t.source == "done":
                    if writer.resumed and await eng.io(writer.check_on_disk, t.chunk):
                        self._verified(t.chunk, "node")
                        continue
                    t = ChunkTask(t.chunk, "network")
                if t.source in ("network", "dup"):
                    # Acquire in plan order: requests go out in the order a loader reads.
                    await eng.bytes_in_flight.acquire(t.chunk.length)
                tasks.append(asyncio.create_task(self._chunk(writer, t)))
            self.issued.set()
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            path = await eng.io(writer.publish, now_s(), verify_file=eng.options.verify_files)
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
            eng.jobs.pop(self.key, None)

    async def _chunk(self, writer: FileWriter, t: ChunkTask) -> None:
        eng = self.engine
        chunk = t.chunk
        holds = t.source in ("network", "dup")
        try:
            if t.source == "local" and t.location is not None:
                if await eng.io(writer.copy_local, chunk, t.location):
                    self._verified(chunk, "node")
                    return
            tier = await eng.obtain(writer, chunk, holds_bytes=holds)
            holds = False  # obtain() released it
            self._verified(chunk, tier)
        finally:
            if holds:
                eng.bytes_in_flight.release(chunk.length)


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


class Engine:
    """Node-wide pull machinery; see the module docstring. Create inside a running loop."""

    def __init__(self, options: AgentOptions, *, node: NodeCache | None = None,
                 store: BlobStore | None = None) -> None:
        self.options = options
        self.node = node or NodeCache(options.cache_dir, options.budget_bytes)
        self.store = store if store is not None else (
            BlobStore(options.store_url) if options.store_url else None)
        # One suspicion for chunks, manifests and refs: a pod that hung on one is
        # passed over for the others.
        self.suspicion = Suspicion(options.suspect_s)
        self.ring = _make_ring_client(options, self.store, self.suspicion)
        owners = self.ring.owners if self.ring is not None else None
        self._loop = asyncio.get_running_loop()
        self.fetcher = Fetcher(options, self.store, owners=owners,
                               on_answer=self._answered, suspicion=self.suspicion)
        self.net_pool = ThreadPoolExecutor(options.max_connections,
                                           thread_name_prefix="bdn-fetch")
        self.io_pool = ThreadPoolExecutor(LOCAL_IO_THREADS, thread_name_prefix="bdn-io")
        self.buffers = BufferPool(options.max_bytes_in_flight)
        self.bytes_in_flight = ByteSemaphore(options.max_bytes_in_flight)
        self.jobs: dict[Digest, FileJob] = {}
        self.inflight: dict[Digest, asyncio.Future[ChunkLocation]] = {}
        self.pulls: dict[str, Pull] = {}
        self.counters: dict[str, int] = {
            **{f"bytes_{t}": 0 for t in TIERS}, "chunks_fetched": 0,
            "chunks_copied_locally": 0, "bad_reports": 0, "chunk_retries": 0,
            "chunks_failed": 0, **dict.fromkeys(ANSWER_COUNTERS.values(), 0),
            "pulls_started": 0, "pulls_done": 0, "pulls_failed": 0}
        # This agent's own registry (tests run several agents in one process).
        self.registry = prom.service_registry()
        self.registry.register(prom.StateCollector(self.collect_metrics))
        self._lock = asyncio.Lock()
        # One lock per mount: linking, sealing and removing in a mount never interleave.
        self._mount_locks: dict[str, asyncio.Lock] = {}
        self._dns_task: asyncio.Task[None] | None = None
        if self.ring is not None and options.peers_dns:
            self._dns_task = asyncio.create_task(self._refresh_peers())
        # Node-to-node sharing: chunks verified here, not yet announced to their pods.
        self._held: list[Digest] = []
        self._held_event = asyncio.Event()
        self._announce_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        if self.ring is not None and options.peer_advertise:
            self._announce_task = asyncio.create_task(self._announce_holders())
            self._renew_task = asyncio.create_task(self._renew_receiving())

    def note_held(self, digest: Digest) -> None:
        """A chunk is verified in the node cache: announce it (sharing on)."""
        if self._announce_task is not None:
            self._held.append(digest)
            self._held_event.set()

    async def _announce_holders(self) -> None:
        """Announce verified chunks to their owning pods, batched every
        ``HOLDERS_ANNOUNCE_S`` (so a pull of 1000 chunks is a handful of requests)."""
        assert self.ring is not None and self.options.peer_advertise
        while True:
            await self._held_event.wait()
            self._held_event.clear()
            batch, self._held = self._held, []
            with contextlib.suppress(Exception):
                await self.ring.announce_holders(self.options.peer_advertise, batch)
            await asyncio.sleep(HOLDERS_ANNOUNCE_S)  # batching interval, not a wait-for

    async def _renew_receiving(self) -> None:
        """Renew the "receiving" records of chunks in flight here for longer than one
        period (a receive that progresses; a stalled one is abandoned by the fetcher
        and then drops out of ``inflight``)."""
        assert self.ring is not None and self.options.peer_advertise
        seen: set[Digest] = set()
        while True:
            await asyncio.sleep(RECEIVING_RENEW_S)  # a renewal period, not a wait-for
            now = set(self.inflight)
            if now & seen:
                with contextlib.suppress(Exception):
                    await self.ring.announce_holders(self.options.peer_advertise,
                                                     sorted(now & seen, key=str),
                                                     receiving=True)
            seen = now

    async def _refresh_peers(self) -> None:
        """Keep the ring's DNS peers fresh; fetch threads read ``ring.owners`` directly."""
        while True:
            with contextlib.suppress(Exception):
                await self.ring.refresh_peers()
            await asyncio.sleep(PEER_REFRESH_S)

    # -- plumbing ------------------------------------------------------------------------

    async def io(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io_pool, lambda: fn(*args, **kw))

    async def close(self) -> None:
        if self._dns_task is not None:
            self._dns_task.cancel()
        if self._announce_task is not None:
            self._announce_task.cancel()
        if self._renew_task is not None:
            self._renew_task.cancel()
        for job in list(self.jobs.values()):
            job.task.cancel()
        for pull in list(self.pulls.values()):
            if pull.task is not None and not pull.task.done():
                pull.task.cancel()
                with contextlib.suppress(BaseException):
                    await pull.task
        self.fetcher.close()  # chunks waiting out a backoff give up now
        if self.ring is not None:
            with contextlib.suppress(Exception):
                await self.ring.close()
        self.net_pool.shutdown(wait=True, cancel_futures=True)
        self.io_pool.shutdown(wait=True, cancel_futures=True)
        self.node.close()

    # -- chunks --------------------------------------------------------------------------

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

    # -- manifests -----------------------------------------------------------------------

    async def resolve(self, name: str) -> tuple[Digest, Manifest]:
        if self.ring is not None:
            try:
                if name.startswith("b3:"):
                    digest = Digest.parse(name)
                else:
                    digest = Digest.parse(str(await self.ring.resolve_ref(name)))
                data = await self.ring.get_manifest_bytes(digest)
                manifest = parse_manifest(data, expect=digest)
                self.ring.remember(digest, manifest)
                return digest, manifest
            except BdnError:
                if self.store is None or self.options.strict:
                    raise
        if self.store is None:
            raise PullError(f"cannot resolve {name}: no blob store and no cluster cache "
                            "client")
        store = self.store
        result: tuple[Digest, Manifest] = await self.io(store.resolve, name)
        if self.ring is not None:
            self.ring.remember(*result)
        return result

    # -- pulls ---------------------------------------------------------------------------

    def restore(self) -> list[Pull]:
        """Load persisted pulls; unfinished ones are started again (resume after crash)."""
        self.node.recover()
        resumed = []
        for _, rec in self.node.meta_items(PULL_KEY_PREFIX):
            pull = Pull(id=rec["id"], request=PullRequest.from_canonical(rec["request"]),
                        key=rec.get("key"), state=rec["state"], error=rec.get("error"),
                        mounts=rec.get("mounts", {}), files=rec.get("files", []),
                        owner_uid=rec.get("owner_uid"))
            self.pulls[pull.id] = pull
            for mount, rels in pull.mounts.items():
                # A cross-device copy killed mid-way may have left a temporary name.
                mountlib.sweep_copy_leftovers(Path(mount), rels)
            if pull.state in ("queued", "running"):
                self._start(pull)
                resumed.append(pull)
            elif pull.state == "done":
                # A loader subscribing after a restart still learns every file is there.
                for mount, rels in pull.mounts.items():
                    for rel in rels:
                        pull.emit({"event": "file", "path": rel, "mount": mount,
                                   "restored": True})
                pull.emit({"event": "done", "restored": True})
            elif pull.state == "failed":
                pull.emit({"event": "error", "message": pull.error or "failed"})
        return resumed

    async def submit(self, request: PullRequest, key: str | None = None, *,
                     owner_uid: int | None = None) -> tuple[Pull, bool]:
        """Start a pull (or return the one started with ``key``); returns (pull, created).

        ``owner_uid``: the caller's uid when the API knows it (recorded on a new pull, so
        the daemon hands a re-posting caller the release token only if it is the owner).
        """
        if key is not None and (not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS):
            raise RequestError(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} chars")
        async with self._lock:
            if key is not None:
                known = self.node.meta_get(IDEM_KEY_PREFIX + key)
                if known is not None and known["id"] in self.pulls:
                    pull = self.pulls[known["id"]]
                    if known["request"] != request.canonical():
                        raise IdempotencyConflict(
                            f"Idempotency-Key {key!r} was used for a different request "
                            f"(pull {pull.id})")
                    if pull.state == "failed":
                        self._start(pull)  # retrying a failed pull is the point of re-posting
                    return pull, False
            pull = Pull(id=uuid.uuid4().hex[:16], request=request, key=key,
                        owner_uid=owner_uid)
            self.pulls[pull.id] = pull
            if key is not None:
                self.node.meta_put(IDEM_KEY_PREFIX + key,
                                   {"id": pull.id, "request": request.canonical()})
            self._persist(pull)
            self._start(pull)
            return pull, True

    def _persist(self, pull: Pull) -> None:
        self.node.meta_put(PULL_KEY_PREFIX + pull.id, pull.record())

    def _start(self, pull: Pull) -> None:
        pull.state, pull.error, pull.finished = "queued", None, None
        pull.events = []
        pull.bytes_by_tier = dict.fromkeys(TIERS, 0)
        pull.bytes_done = pull.files_done = 0
        pull.started = time.monotonic()
        self.counters["pulls_started"] += 1
        pull.task = asyncio.create_task(self._run(pull), name=f"pull {pull.id}")

    async def wait(self, pull: Pull) -> None:
        if pull.task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(pull.task)

    async def _run(self, pull: Pull) -> None:
        pull.state = "running"
        self._persist(pull)
        try:
            await self._execute(pull)
        except asyncio.CancelledError:
            pull.finished = time.monotonic()
            raise
        except Exception as e:
            msg = str(e) if isinstance(e, BdnError) else f"{type(e).__name__}: {e}"
            log.warning("pull %s failed: %s", pull.id, msg)
            pull.state, pull.error, pull.finished = "failed", msg, time.monotonic()
            self.counters["pulls_failed"] += 1
            await self._undo_mounts(pull)
            self.node.unpin(pull.id, [Digest(h) for h in pull.files])
            self.node.release_reservation(pull.id)
            if isinstance(e, DiskFullError):
                # Partial files of a pull the disk could not hold only hold the disk.
                self.node.reclaim_partials(Digest(h) for h in pull.files
                                           if Digest(h) not in self.jobs)
            self._persist(pull)
            pull.emit({"event": "error", "message": msg, "error": type(e).__name__})
            return
        pull.state, pull.finished = "done", time.monotonic()
        self.counters["pulls_done"] += 1
        if not pull.mounts:
            # A pre-warm pull holds nothing once the node cache has the files.
            self.node.unpin(pull.id, [Digest(h) for h in pull.files])
        self.node.release_reservation(pull.id)
        self._persist(pull)
        pull.emit({"event": "done", "bytes_by_tier": dict(pull.bytes_by_tier),
                   "seconds": round(pull.finished - pull.started, 3)})

    async def _execute(self, pull: Pull) -> None:
        # 1. Resolve every target to files.
        targets: list[PullTarget] = []
        pull.manifests = []
        for spec in pull.request.targets:
            digest, manifest = await self.resolve(spec.name)
            pull.manifests.append(str(digest))
            files = select_files(manifest, spec.allow, spec.ignore)
            if not files:
                raise PullError(f"{spec.name} has no files matching allow={list(spec.allow)} "
                                f"ignore={list(spec.ignore)}", pull_id=pull.id)
            targets.append(PullTarget(spec.mount, files))
        # 2. Every mount path is checked before anything is written anywhere.
        await self._check_mounts(targets)
        # 3. Plan against what the node has.
        digests = {content_key(f) for t in targets for f in t.files}
        chunk_digests = {c.digest for t in targets for f in t.files for c in f.chunks}
        plan = plan_pull(targets, have_files=self.node.complete_files(digests),
                         chunk_locations=self.node.chunk_locations(chunk_digests),
                         journals=self.node.journals(digests),
                         options=PlanOptions(order=pull.request.order))
        # 4. Room under the budget (pins every file of the pull; may evict others).
        pull.files = sorted(d.hex for d in plan.sizes)
        pull.mounts = {}
        for link in plan.links:
            pull.mounts.setdefault(link.mount, []).append(link.path)
        self._persist(pull)
        await self.io(self.node.reserve, pull.id, dict(plan.sizes), now_s())
        pull.bytes_total = sum(e.size for t in targets for e in t.files)
        pull.files_total = sum(len(t.files) for t in targets)
        pull.emit(self._plan_event(plan, targets))
        # 5. Files: cached ones are linked at once; the rest are written, in order.
        by_digest: dict[Digest, list[tuple[str | None, FileEntry]]] = {}
        for t in targets:
            for f in t.files:
                by_digest.setdefault(content_key(f), []).append((t.mount, f))
        self.node.touch([content_key(e) for e in plan.cached], now_s())
        for entry in plan.cached:
            src = self.node.file_path(content_key(entry))
            for mount, f in by_digest[content_key(entry)]:
                pull.bytes_by_tier["node"] += f.size
                self.counters["bytes_node"] += f.size
                await self._publish_in_mount(pull, mount, f, src)
        waits: list[asyncio.Task[None]] = []
        for fp in plan.files:
            job = self.jobs.get(fp.digest)
            if job is None:
                job = self.jobs[fp.digest] = FileJob(self, fp)
            self._listen(pull, job, by_digest[fp.digest])
            waits.append(asyncio.create_task(self._finish_file(pull, job,
                                                               by_digest[fp.digest])))
            await job.issued.wait()
        try:
            await asyncio.gather(*waits)
        except BaseException:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            raise
        for mount in pull.mounts:
            await self._mount_io(mount, self._seal_locked, mount)

    def _plan_event(self, plan: PullPlan, targets: list[PullTarget]) -> dict[str, Any]:
        by = plan.bytes_by_source()
        return {"event": "plan", "bytes": sum(f.size for t in targets for f in t.files),
                "files": [{"path": f.path, "mount": t.mount, "size": f.size,
                           "digest": str(f.digest)} for t in targets for f in t.files],
                "bytes_cached": by["cached"], "bytes_resumed": by["done"],
                "bytes_local": by["local"], "bytes_network": by["network"],
                "bytes_duplicate": by["dup"]}

    def _listen(self, pull: Pull, job: FileJob,
                uses: list[tuple[str | None, FileEntry]]) -> None:
        def on_start(partial: str) -> None:
            for mount, f in uses:
                pull.emit({"event": "file_start", "path": f.path, "mount": mount,
                           "size": f.size, "partial_path": partial, "disk_path": partial})

        def on_chunk(chunk: Chunk, tier: str) -> None:
            if pull.state != "running":
                return
            for i, (mount, f) in enumerate(uses):
                # A duplicate of a file is a hardlink: its bytes come from the node.
                pull.bytes_by_tier[tier if i == 0 else "node"] += chunk.length
                pull.bytes_done += chunk.length
                pull.emit({"event": "chunk", "path": f.path, "mount": mount,
                           "offset": chunk.offset, "length": chunk.length, "size": f.size,
                           "tier": tier, "disk_path": job.disk_path})
        job.subscribe(on_chunk, on_start)

    async def _finish_file(self, pull: Pull, job: FileJob,
                           uses: list[tuple[str | None, FileEntry]]) -> None:
        path = await asyncio.shield(job.future)
        for mount, f in uses:
            await self._publish_in_mount(pull, mount, f, path, count_bytes=False)

    async def _publish_in_mount(self, pull: Pull, mount: str | None, f: FileEntry,
                                src: Path, *, count_bytes: bool = True) -> None:
        if mount is not None:
            await self._mount_io(mount, self._link_locked, mount, f.path, src)
        pull.files_done += 1
        if count_bytes:
            pull.bytes_done += f.size
        pull.emit({"event": "file", "path": f.path, "mount": mount, "digest": str(f.digest),
                   "size": f.size})

    # -- mounts --------------------------------------------------------------------------
    #
    # A mount is shared by every live pull naming it: the references are the pull records
    # (``Pull.mounts``, persisted), what the agent created there is the mount's ledger
    # (``agent.mounts.MountLedger``, persisted under MOUNT_KEY_PREFIX). A path is removed
    # only when no other live pull names it, and only if the agent created it.

    def _mount_lock(self, mount: str) -> asyncio.Lock:
        lock = self._mount_locks.get(mount)
        if lock is None:
            lock = self._mount_locks[mount] = asyncio.Lock()
        return lock

    async def _mount_io(self, mount: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the I/O pool holding the mount's lock. A cancelled caller still
        waits for the thread to finish, so the lock never frees while it writes."""
        async with self._mount_lock(mount):
            fut = asyncio.ensure_future(self.io(fn, *args))
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                await asyncio.wait([fut])
                raise

    def _ledger(self, mount: str) -> mountlib.MountLedger:
        return mountlib.MountLedger.from_doc(mount, self.node.meta_get(MOUNT_KEY_PREFIX + mount))

    def _save_ledger(self, ledger: mountlib.MountLedger) -> None:
        if ledger.empty:
            self.node.meta_delete(MOUNT_KEY_PREFIX + ledger.mount)
        else:
            self.node.meta_put(MOUNT_KEY_PREFIX + ledger.mount, ledger.to_doc())

    def _mount_users(self, mount: str, exclude: str) -> list[list[str]]:
        """The paths each other live pull names in ``mount``, from this agent's pulls and
        from records it did not load (a standalone ``bdn pull`` on the same node cache)."""
        users = [p.mounts[mount] for p in self.pulls.values()
                 if p.id != exclude and p.state in LIVE_STATES and mount in p.mounts]
        for _, rec in self.node.meta_items(PULL_KEY_PREFIX):
            if (rec["id"] != exclude and rec["id"] not in self.pulls
                    and rec.get("state") in LIVE_STATES and mount in rec.get("mounts", {})):
                users.append(list(rec["mounts"][mount]))
        return users

    async def _check_mounts(self, targets: list[PullTarget]) -> None:
        for t in targets:
            if t.mount is None:
                continue
            digests = {f.path: content_key(f) for f in t.files}
            have = self.node.complete_files(set(digests.values()))
            expected = {rel: self.node.file_path(d) for rel, d in digests.items() if d in have}
            await self._mount_io(t.mount, lambda m=t.mount, fs=t.files, e=expected:
                                 mountlib.check_mount_paths(m, [f.path for f in fs],
                                                            ledger=self._ledger(m),
                                                            expected=e))

    def _link_locked(self, mount: str, rel: str, src: Path) -> None:
        mountlib.link_file(Path(mount), rel, src, self._ledger(mount), self._save_ledger)

    def _seal_locked(self, mount: str) -> None:
        mountlib.seal(Path(mount), self._ledger(mount))

    def _release_locked(self, mount: str, rels: list[str], users: list[list[str]]) -> None:
        kept = {rel for paths in users for rel in paths}
        keep_dirs = {d for rel in kept for d in mountlib.parent_dirs(rel)}
        ledger = self._ledger(mount)
        try:
            mountlib.release(Path(mount), ledger, [r for r in rels if r not in kept],
                             keep_dirs)
        finally:
            self._save_ledger(ledger)
        if users:
            mountlib.seal(Path(mount), ledger)

    async def _undo_mounts(self, pull: Pull) -> None:
        for mount, rels in pull.mounts.items():
            async with self._mount_lock(mount):
                # Users are counted under the lock: a pull that linked anything here
                # registered its paths before, so it is counted.
                users = self._mount_users(mount, exclude=pull.id)
                fut = asyncio.ensure_future(self.io(self._release_locked, mount,
                                                    list(rels), users))
                try:
                    await asyncio.shield(fut)
                except asyncio.CancelledError:
                    await asyncio.wait([fut])
                    raise
                except OSError as e:
                    log.warning("releasing mount %s of pull %s: %s", mount, pull.id, e)

    async def release(self, pull_id: str) -> Pull:
        """Release a pull's mounts and pins (``DELETE /v1/pulls/{id}``)."""
        pull = self.pulls.get(pull_id)
        if pull is None:
            raise KeyError(pull_id)
        if pull.task is not None and not pull.task.done():
            pull.task.cancel()
            with contextlib.suppress(BaseException):
                await pull.task
        await self._undo_mounts(pull)
        self.node.unpin(pull.id, [Digest(h) for h in pull.files])
        self.node.release_reservation(pull.id)
        pull.state = "released"
        pull.finished = pull.finished or time.monotonic()
        self._persist(pull)
        if pull.key:
            self.node.meta_delete(IDEM_KEY_PREFIX + pull.key)
        if not pull.events or pull.events[-1].get("event") not in ("done", "error"):
            pull.emit({"event": "error", "message": "the pull was released"})
        return pull

    def close_streams(self) -> None:
        """End every event stream (the agent is stopping; clients reconnect later)."""
        for pull in self.pulls.values():
            pull.closed = True
            pull._changed.set()

    def collect_metrics(self) -> Iterator[prom.Metric]:
        """The agent's families (``/metrics``), read from its live state."""
        yield prom.counter("bdn_agent_delivered_bytes_total",
                           "Bytes delivered to pulls, by the tier they came from.",
                           [({"tier": t}, self.counters.get(f"bytes_{t}", 0)) for t in TIERS])
        for name, value in sorted(self.counters.items()):
            if name.startswith("bytes_") and name[len("bytes_"):] in TIERS:
                continue
            yield prom.counter(f"bdn_agent_{name}_total",
                               COUNTER_HELP.get(name, f"Agent counter {name}."), value=value)
        yield prom.gauge("bdn_agent_buffer_pool_bytes",
                         "Bytes of fetch buffers allocated now.", value=self.buffers.total_bytes)
        yield prom.gauge("bdn_agent_buffer_pool_max_bytes",
                         "Most bytes of fetch buffers allowed.", value=self.buffers.max_bytes)
        for key, value in sorted(self.node.stats().items()):
            name, help_ = NODE_CACHE_GAUGES.get(key, (f"bdn_node_cache_{key}",
                                                      f"Node cache {key}."))
            yield prom.gauge(name, help_, value=value)
        states: dict[str, int] = {}
        for p in self.pulls.values():
            states[p.state] = states.get(p.state, 0) + 1
        yield prom.gauge("bdn_agent_pulls", "Pulls known to the agent, by state.",
                         [({"state": st}, n) for st, n in sorted(states.items())])


def _make_ring_client(options: AgentOptions, store: BlobStore | None,
                      suspicion: Suspicion) -> RingClient | None:
    """The one ring (peer list, DNS refresh, placement) when cache peers are set.

    Manifests and refs are asked with the chunks' deadlines: a hung pod costs a
    first-byte deadline (the read timeout of a small answer) before the next is asked.
    """
    if not options.peers and not options.peers_dns:
        return None
    ring_options = RingClientOptions(
        peers=options.peers, dns_name=options.peers_dns,
        dns_port=options.peers_dns_port, strict_origin=options.strict,
        connect_timeout_s=options.connect_timeout_s,
        read_timeout_s=options.first_byte_timeout_s, retry=options.retry)
    return RingClient(ring_options, store, suspicion=suspicion)
