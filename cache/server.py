"""The cluster cache server: read-through, single-flight, ranged, on a byte budget.

HTTP API (all digests ``b3:<hex>``):

- ``GET|HEAD /v1/objects/{digest}`` — the object's decoded bytes (a HEAD of an uncached
  object starts its fill and answers once the size is known). ``Range: bytes=a-b``,
  ``a-`` and ``-n`` give 206 with ``Content-Range``; a range past the end gives 416 with
  ``Content-Range: bytes */size``; several ranges are answered with the whole object
  (200). ``ETag`` is the quoted digest, ``Cache-Control: immutable``; ``If-None-Match``
  (weak comparison, lists, ``*``) gives 304, on a miss after its fill; ``If-Range`` with
  another validator or a date gives the whole object. A digest the store lacks is
  answered 404 from memory for ``NEGATIVE_TTL_S`` after it was looked up. A cached object is
  sent with ``sendfile``; a miss starts (or joins) the object's one fill and streams from
  it as bytes arrive. ``X-Bdn-Cache`` says ``hit``, ``miss`` or ``coalesced``. With
  ``Cache-Control: only-if-cached`` (RFC 9111 §5.2.1.7) a miss is answered 504 instead
  of starting a fill (a fill in flight is joined): agents send it to every pod but the
  one whose turn it is to fill, so a hedge never becomes a second store read.
- ``GET /v1/manifests/{digest}`` — a manifest's bytes (manifests are objects).
- ``GET /v1/refs/{namespace}/{model}/{tag}`` — ``{"ref", "digest"}``, cached for
  ``ref_ttl_s`` (refs move; a short TTL bounds how stale a scale-up can be).
- ``POST /v1/objects/{digest}/verify`` — re-hash the cached copy; drop it if bad (at
  most once per object per ``verify_interval_s``; sooner: 429 with ``Retry-After``).
- ``POST /v1/prefetch`` ``{"manifest": "b3:..."}`` or ``{"ref": "ns/m:t"}`` (optionally
  ``"peers"`` and ``"self"`` to keep only the objects this peer owns on the ring) —
  queue background fills of the manifest's objects, rate limited (202). ``peers``: at
  most ``MAX_PREFETCH_PEERS`` http(s) URLs (else 400); the body must arrive within
  ``body_timeout_s`` (else 408).
- ``POST /v1/holders`` ``{"agent": "http://node:7471", "digests": ["b3:...", ...]}`` —
  an agent holds these chunks, complete and verified (at most ``MAX_HOLDER_DIGESTS``;
  with ``"receiving": true``: it is still receiving them, a renewal of its progress);
  ``GET /v1/holders/{digest}`` (``?exclude=URL[&receiving=1]``) —
  ``{"holders": [...], "receiving": [...]}``, whom to ask (holders, or agents still
  receiving it, a subset named in ``receiving``), and with ``receiving=1`` the asker is
  recorded as receiving it; ``DELETE /v1/holders/{digest}?agent=URL`` — that agent's
  copy was bad. A short-lived record (:mod:`cache.tracker`) so agents fetch from each
  other.
- ``GET /metrics`` (Prometheus text), ``GET /healthz``.

Errors are JSON ``{"error": sentence, "digest": ...}``: 404 when the store has no such
object, 503 (with ``Retry-After``) when the store cannot be read, 502 when the store's
bytes do not match their digest. Failures after the headers went out abort the
connection (see :mod:`cache.fill`).

Why so: every store read happens in a worker thread (the blob store is synchronous and
may be remote) so the event loop only moves bytes; complete objects go out with
``loop.sendfile`` from the page cache, and the per-request bookkeeping is a dict lookup,
a pin and an in-memory LRU touch (the index is written in batches, see
:mod:`cache.disk`). With ``workers`` > 1 this process is the *owner* of the cache folder
and hit workers serve complete objects beside it on the same port, forwarding the rest
here (:mod:`cache.workers`); ``X-Bdn-Worker`` names the process that answered (0: this).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard
from aiohttp import web

from bdn import metrics as prom
from bdn.errors import NotFoundError
from bdn.store import OBJECTS_PREFIX, Backend, BlobStore, object_key, open_backend
from cache.disk import ACCESS_FLUSH_S, DiskOptions, DiskStore
from cache.edge import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    VERIFY_INTERVAL_S,
    EdgeOptions,
    NegativeCache,
    PerKeyRateLimit,
    check_peers,
    head_limit_middleware,
)
from cache.errors import (
    CacheError,
    CacheNotFoundError,
    FillError,
    FillIntegrityError,
    StoreUnavailableError,
)
from cache.fastpath import FastPath, OpenObject, answer_hit, if_none_match
from cache.fill import FILL_BLOCK_BYTES, Fill, FillAborted, RateLimiter, produce
from cache.ring import digest_key, manifest_objects, place
from cache.send import (
    OCTET_STREAM,
    OWNER_WORKER,
    Sender,
    abort,
    not_modified,
    object_headers,
    parse_range,
    prepare_range,
)
from cache.tracker import HolderTracker
from manifests.digest import ALGORITHM, Digest, Hasher
from manifests.errors import BdnError, DigestError
from manifests.manifest import ENCODING_RAW, ENCODING_ZSTD, parse_manifest
from manifests.refs import Ref

log = logging.getLogger(__name__)

# Chunks one holders announcement may name (an agent batches what it verified).
MAX_HOLDER_DIGESTS = 4096

REF_TTL_S = 5.0
MAX_CACHED_REFS = 10_000
MAX_CACHED_DIGESTS = 100_000
DEFAULT_PREFETCH_RATE_BYTES_PER_S = 100 * 1024 * 1024
DEFAULT_PREFETCH_CONCURRENCY = 2
DEFAULT_FILL_THREADS = 32
DEFAULT_SEND_THREADS = 16
# send_threads left to the server: DEFAULT_SEND_THREADS with one process; with several
# none — each process has its event loop on a core, and sending from the loop costs
# less CPU per response than a thread hop (cache.send).
SEND_THREADS_AUTO = -1
RETRY_AFTER_S = 1
VERIFY_BLOCK_BYTES = 4 * 1024 * 1024
SHUTDOWN_FILL_WAIT_S = 5.0
ZSTD_HEADER_PEEK_BYTES = 18
FILL_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_CPU_QUOTA_US = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
CGROUP_V1_CPU_PERIOD_US = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def _cgroup_cpu_limit() -> float | None:
    """The container's CPU limit in CPUs (cgroup quota ÷ period), or None if unlimited."""
    try:
        quota, _, period = Path(CGROUP_V2_CPU_MAX).read_text().partition(" ")
    except OSError:
        try:
            quota = Path(CGROUP_V1_CPU_QUOTA_US).read_text()
            period = Path(CGROUP_V1_CPU_PERIOD_US).read_text()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None  # "max": no limit
    return q / p if q > 0 and p > 0 else None


def default_workers() -> int:
    """Serving processes by default: the CPUs this process may use — those it may run
    on, capped by the container's CPU limit — at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


@dataclass(frozen=True)
class CacheServerOptions:
    """``store_url``: the blob store; ``cache_dir``/``budget_bytes``: the disk store.

    ``prefetch_rate_bytes_per_s`` and ``prefetch_concurrency`` bound background fills;
    ``fill_threads`` bounds concurrent store reads; ``send_threads`` how many responses
    are sent by ``sendfile`` at once off the event loop (0: on the loop), per process
    (default ``SEND_THREADS_AUTO``: none with several workers, 16 with one);
    ``ref_ttl_s`` how long a resolved ref is reused; ``fsync`` makes completed fills
    survive power loss; ``workers`` how many processes serve the port (the owner and
    ``workers`` − 1 hit workers, see :mod:`cache.workers`; default 1; ``default_workers()``
    gives the CPUs the process may use). ``idle_timeout_s``, ``header_timeout_s`` and
    ``body_timeout_s`` bound every connection of the port (see :mod:`cache.edge`);
    ``verify_interval_s``: the least time between two re-hashes of one object by
    ``/verify`` (0: no limit).
    """

    store_url: str
    cache_dir: str
    budget_bytes: int
    prefetch_rate_bytes_per_s: int = DEFAULT_PREFETCH_RATE_BYTES_PER_S
    prefetch_concurrency: int = DEFAULT_PREFETCH_CONCURRENCY
    fill_threads: int = DEFAULT_FILL_THREADS
    send_threads: int = SEND_THREADS_AUTO
    ref_ttl_s: float = REF_TTL_S
    fsync: bool = False
    # One by default: a miss taken by a worker is relayed through it, which costs the cold
    # fill CPU; several pay on nodes whose cores outrun one Python process's sendfile loop.
    workers: int = 1
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    verify_interval_s: float = VERIFY_INTERVAL_S

    @property
    def edge(self) -> EdgeOptions:
        return EdgeOptions(self.idle_timeout_s, self.header_timeout_s, self.body_timeout_s)

    def __post_init__(self) -> None:
        if not self.store_url:
            raise ValueError("CacheServerOptions.store_url is required")
        if not self.cache_dir:
            raise ValueError("CacheServerOptions.cache_dir is required")
        if self.budget_bytes < 0:
            raise ValueError("CacheServerOptions.budget_bytes must be ≥ 0")
        if self.prefetch_rate_bytes_per_s <= 0:
            raise ValueError("CacheServerOptions.prefetch_rate_bytes_per_s must be > 0")
        if self.send_threads < SEND_THREADS_AUTO:
            raise ValueError("CacheServerOptions.send_threads must be ≥ 0 (or "
                             "SEND_THREADS_AUTO)")
        if self.prefetch_concurrency < 1 or self.fill_threads < 1:
            raise ValueError("CacheServerOptions: prefetch_concurrency and fill_threads ≥ 1")
        if self.ref_ttl_s < 0:
            raise ValueError("CacheServerOptions.ref_ttl_s must be ≥ 0")
        if self.workers < 1:
            raise ValueError("CacheServerOptions.workers must be ≥ 1")
        if not self.verify_interval_s >= 0:
            raise ValueError("CacheServerOptions.verify_interval_s must be ≥ 0")
        try:
            self.edge  # noqa: B018 (validates the timeouts)
        except ValueError as e:
            raise ValueError(str(e).replace("EdgeOptions.", "CacheServerOptions.")) from None
        if self.send_threads == SEND_THREADS_AUTO:
            object.__setattr__(self, "send_threads",
                               0 if self.workers > 1 else DEFAULT_SEND_THREADS)


# -- the store, counted --------------------------------------------------------------


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


# -- metrics -------------------------------------------------------------------------


class Metrics:
    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.coalesced = 0
        self.bytes_served = 0
        self.bytes_filled = 0
        self.fill_failures: dict[str, int] = {}
        self.fill_buckets = [0] * (len(FILL_SECONDS_BUCKETS) + 1)
        self.fill_sum_s = 0.0
        self.fill_count = 0
        self.prefetch_queued = 0
        self.prefetch_filled = 0
        self.invalidated = 0
        # Hits and bytes served by each worker process (the owner's: the rest).
        self.worker_hits: dict[int, int] = {}
        self.worker_bytes: dict[int, int] = {}

    def observe_fill(self, seconds: float) -> None:
        self.fill_count += 1
        self.fill_sum_s += seconds
        for i, n in enumerate(prom.bucket_counts(FILL_SECONDS_BUCKETS, (seconds,))):
            self.fill_buckets[i] += n

    def fail(self, reason: str) -> None:
        self.fill_failures[reason] = self.fill_failures.get(reason, 0) + 1


def _agent_url(value: object, field: str) -> str:
    """A holders request's agent URL (the prefetch peers' rules), naming ``field``."""
    try:
        return check_peers([value])[0]
    except ValueError:
        raise ValueError(f'"{field}" must be an http(s):// URL, got {repr(value)[:80]}'
                         ) from None


def only_if_cached(request: web.Request) -> bool:
    """Whether the request carries ``Cache-Control: only-if-cached`` (RFC 9111
    §5.2.1.7): answer from what is cached (or a fill already in flight, which costs no
    further store read), else 504 — never start a fill."""
    return any(d.strip().lower() == "only-if-cached"
               for v in request.headers.getall("Cache-Control", [])
               for d in v.split(","))


def _error(status: int, message: str, digest: str = "",
           headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": message}
    if digest:
        body["digest"] = digest
    return web.json_response(body, status=status, headers=headers)


class CacheServer:
    """The cache service: a disk store, the fills in flight, and the HTTP handlers."""

    def __init__(self, options: CacheServerOptions, store: BlobStore | None = None) -> None:
        self.options = options
        if store is None:
            self.backend = CountingBackend(open_backend(options.store_url))
            store = BlobStore(options.store_url, backend=self.backend)
        else:
            self.backend = CountingBackend(store.backend)
            store = BlobStore(store.url, store.options, backend=self.backend)
        self.store = store
        self.disk = DiskStore(options.cache_dir, DiskOptions(
            options.budget_bytes, fsync=options.fsync, shared_readers=options.workers > 1))
        self.metrics = Metrics()
        # This server's own registry (never the global one: tests run several servers
        # in one process); its counts are the owner's, worker processes' notes included.
        self.registry = prom.service_registry()
        self.registry.register(prom.StateCollector(self.collect_metrics))
        self.fills: dict[Digest, Fill] = {}
        self._fill_tasks: set[asyncio.Task[None]] = set()
        self._executor = ThreadPoolExecutor(options.fill_threads,
                                            thread_name_prefix="bdn-cache-fill")
        self.sender = Sender(options.send_threads)
        self._limiter = RateLimiter(options.prefetch_rate_bytes_per_s)
        self._prefetch_queue: asyncio.Queue[Digest] | None = None
        self._prefetch_pending: set[Digest] = set()
        self._prefetch_workers: list[asyncio.Task[None]] = []
        self._refs: dict[Ref, tuple[Digest, float]] = {}
        self._digests: dict[str, Digest] = {}
        # Unauthenticated routes stay cheap: misses of digests the store lacks are
        # answered from memory for a while; /verify re-hashes an object rarely.
        self.negative = NegativeCache()
        self._verify_limit = PerKeyRateLimit(options.verify_interval_s)
        self.holders = HolderTracker()
        self._flush_task: asyncio.Task[None] | None = None
        # Serving processes that listen now, index → pid (0: this one; cache.workers),
        # and how to collect their pending notes before /metrics is answered.
        self.processes: dict[int, int] = {OWNER_WORKER: os.getpid()}
        self.collect_worker_notes: Callable[[], Awaitable[None]] | None = None

    # -- lifecycle -----------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024,
                              middlewares=[head_limit_middleware])
        app.router.add_route("GET", "/v1/objects/{digest}", self.handle_object)
        app.router.add_route("HEAD", "/v1/objects/{digest}", self.handle_object)
        app.router.add_post("/v1/objects/{digest}/verify", self.handle_verify)
        app.router.add_route("GET", "/v1/manifests/{digest}", self.handle_manifest)
        app.router.add_route("HEAD", "/v1/manifests/{digest}", self.handle_manifest)
        app.router.add_get("/v1/refs/{namespace}/{model}/{tag}", self.handle_ref)
        app.router.add_post("/v1/prefetch", self.handle_prefetch)
        app.router.add_post("/v1/holders", self.handle_holders_post)
        app.router.add_get("/v1/holders/{digest}", self.handle_holders_get)
        app.router.add_delete("/v1/holders/{digest}", self.handle_holders_delete)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/healthz", self.handle_healthz)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._prefetch_queue = asyncio.Queue()
        self._prefetch_workers = [asyncio.create_task(self._prefetch_worker())
                                  for _ in range(self.options.prefetch_concurrency)]
        self._flush_task = asyncio.create_task(self._flush_loop())

    async def _on_shutdown(self, app: web.Application) -> None:
        # Before aiohttp waits for in-flight requests: sends to clients that keep
        # reading finish; sends to stalled clients end within SEND_POLL_SLICE_S.
        self.sender.stop()

    async def _on_cleanup(self, app: web.Application) -> None:
        self.sender.stop()
        for t in [*self._prefetch_workers, *([self._flush_task] if self._flush_task else [])]:
            t.cancel()
        for fill in self.fills.values():
            fill.cancelled = True
        if self._fill_tasks:
            await asyncio.wait(self._fill_tasks, timeout=SHUTDOWN_FILL_WAIT_S)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.sender.close()
        self.disk.close()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(ACCESS_FLUSH_S)
            self.disk.flush()
            self.holders.expire(time.monotonic())

    # -- fills ---------------------------------------------------------------------

    def _join(self, digest: Digest, *, background: bool = False) -> tuple[Fill, str]:
        """The fill of ``digest``: joined if one is in flight, started otherwise."""
        fill = self.fills.get(digest)
        if fill is not None:
            if not background:
                fill.promote()
                self.metrics.coalesced += 1
            return fill, "coalesced"
        fill = Fill(digest, background=background)
        self.fills[digest] = fill
        if not background:
            self.metrics.misses += 1
        task = asyncio.create_task(self._run_fill(fill))
        self._fill_tasks.add(task)
        task.add_done_callback(self._fill_tasks.discard)
        return fill, "miss"

    async def _run_fill(self, fill: Fill) -> None:
        loop = asyncio.get_running_loop()
        digest = fill.digest
        store = self.store
        slot = None
        try:
            try:
                info = await loop.run_in_executor(self._executor, store.stat_object, digest)
            except Exception as e:
                raise StoreUnavailableError(
                    f"blob store {store.url} unavailable while looking up {digest}: "
                    f"{type(e).__name__}: {e}", digest=str(digest), url=store.url) from e
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
                    blocks = store.iter_object(digest, FILL_BLOCK_BYTES)
                    return produce(fill, blocks, slot.fd if slot else None, loop,
                                   self._limiter)
                except (FillAborted, NotFoundError):
                    raise
                except Exception as e:
                    raise StoreUnavailableError(
                        f"blob store {store.url} failed while reading {digest}: "
                        f"{type(e).__name__}: {e}", digest=str(digest), url=store.url) from e

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
            if self.fills.get(digest) is fill:
                del self.fills[digest]

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

    # -- object serving ------------------------------------------------------------

    async def handle_object(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, OCTET_STREAM)

    async def handle_manifest(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "application/json")

    def _headers(self, digest: Digest, content_type: str, state: str) -> dict[str, str]:
        return object_headers(str(digest), content_type, state, str(OWNER_WORKER))

    def _parse_digest(self, text: str) -> Digest:
        """``Digest.parse``, remembered: hot objects are asked for over and over."""
        d = self._digests.get(text)
        if d is None:
            d = Digest.parse(text)
            if len(self._digests) >= MAX_CACHED_DIGESTS:
                self._digests.clear()
            self._digests[text] = d
        return d

    async def _serve(self, request: web.Request, content_type: str) -> web.StreamResponse:
        try:
            digest = self._parse_digest(request.match_info["digest"])
        except DigestError as e:
            return _error(400, str(e))
        try:
            obj = self._open(digest)
        except FileNotFoundError:
            self.metrics.hits += 1
            self.disk.drop(digest)
            return _error(503, f"object {digest} vanished from the cache disk; retry",
                          str(digest), {"Retry-After": str(RETRY_AFTER_S)})
        except OSError as e:  # EMFILE and the like: this process is out of something
            return _error(503, f"cannot open object {digest} now ({e.strerror}); retry",
                          str(digest), {"Retry-After": str(RETRY_AFTER_S)})
        if obj is not None:
            headers = self._headers(digest, content_type, "hit")
            return await answer_hit(request, self, self.sender, obj, digest.hex, headers)
        if digest not in self.fills and self.negative.absent(digest, time.monotonic()):
            return _error(404, f"object {digest} not found in blob store {self.store.url} "
                          f"(looked up less than {self.negative.ttl_s:g} s ago)", str(digest))
        if digest not in self.fills and only_if_cached(request):
            # Not the pod asked to fill this object (a hedge, or a second ask): a miss
            # here must not become a second store read of it.
            return _error(504, f"object {digest} is not cached here (only-if-cached)",
                          str(digest))
        fill, state = self._join(digest)
        return await self._serve_fill(request, fill, content_type, state)

    def _prepare_range(self, request: web.Request, digest: Digest, size: int,
                       headers: dict[str, str]) -> tuple[int, int, int] | web.Response:
        return prepare_range(request, str(digest), size, headers)

    # -- hits answered without aiohttp (cache.fastpath) ------------------------------

    def fast_path(self) -> FastPath:
        """This process's fast path for hits, in front of :meth:`make_app`'s app."""
        return FastPath(self, self.sender, str(OWNER_WORKER), self.options.edge)

    # The owner's pins are its own bookkeeping, released when the response ends.
    hooks_last_byte = False

    def open_hit(self, hex_: str) -> OpenObject | None:
        try:
            return self._open(self._parse_digest(f"{ALGORITHM}:{hex_}"))
        except OSError:
            return None  # aiohttp's path drops a vanished entry and words the 503

    def _open(self, digest: Digest) -> OpenObject | None:
        """The complete object opened and pinned; None if it is not complete here.
        :class:`FileNotFoundError` if the index has it but its file is gone."""
        path = self.disk.lookup(digest)
        size = self.disk.size_of(digest)
        if path is None or size is None:
            return None
        self.disk.pin(digest)
        try:
            # Opened while pinned: eviction cannot choose it until this reader is done.
            return OpenObject(open(path, "rb"), size, digest)
        except FileNotFoundError:
            self.disk.unpin(digest)
            raise

    def hit_started(self, obj: OpenObject, hex_: str, nbytes: int) -> None:
        assert isinstance(obj.key, Digest)
        self.metrics.hits += 1
        self.disk.touch(obj.key)

    def before_last_byte(self, obj: OpenObject) -> None:
        pass

    def hit_ended(self, obj: OpenObject, nbytes: int, whole: bool) -> None:
        assert isinstance(obj.key, Digest)
        obj.file.close()
        self.disk.unpin(obj.key)
        if whole:
            self.metrics.bytes_served += nbytes

    async def _serve_fill(self, request: web.Request, fill: Fill, content_type: str,
                          state: str) -> web.StreamResponse:
        digest = fill.digest
        self.disk.pin(digest)
        f: BinaryIO | None = None
        try:
            await fill.size_known.wait()
            if fill.size is None and not fill.done.is_set():
                await fill.done.wait()  # size unknown until the end (memory-backed fill)
            if fill.error is not None:
                return self._fill_error_response(fill.error, digest)
            size = fill.size
            assert size is not None
            headers = self._headers(digest, content_type, state)
            if not_modified(if_none_match(request), headers["ETag"]):
                return web.Response(status=304, headers=headers)
            prep = self._prepare_range(request, digest, size, headers)
            if isinstance(prep, web.Response):
                return prep
            status, start, end = prep
            if fill.slot is not None or fill.final_path is not None:
                # Same loop tick as the state check: the rename/unlink cannot interleave.
                f = open(fill.final_path or fill.slot.path, "rb")  # type: ignore[union-attr]
            resp = web.StreamResponse(status=status, headers=headers)
            resp.content_length = end - start
            try:
                await resp.prepare(request)
            except ConnectionError:
                abort(request)
                return resp
            if request.method == "HEAD":
                await resp.write_eof()
                return resp
            pos = start
            while pos < end:
                if fill.error is not None:
                    abort(request)  # never a clean end: the client must see it fail
                    return resp
                # Until the fill is verified, the last byte of the range is held back.
                limit = end if fill.ok else min(fill.written, end - 1)
                if limit <= pos:
                    await fill.wait_progress()
                    continue
                try:
                    if f is not None:
                        await self.sender.sendfile(request, f, pos, limit - pos)
                    else:
                        for view in fill.iter_memory(pos, limit):
                            await resp.write(view)
                except ConnectionError:
                    abort(request)
                    return resp  # the client went away; the fill goes on for others
                self.metrics.bytes_served += limit - pos
                pos = limit
            await resp.write_eof()
            return resp
        finally:
            if f is not None:
                f.close()
            self.disk.unpin(digest)

    def _fill_error_response(self, error: BaseException, digest: Digest) -> web.Response:
        if isinstance(error, NotFoundError):
            return _error(404, str(error), str(digest))
        if isinstance(error, FillIntegrityError):
            return _error(502, str(error), str(digest))
        if isinstance(error, StoreUnavailableError):
            return _error(503, str(error), str(digest), {"Retry-After": str(RETRY_AFTER_S)})
        return _error(500, f"filling {digest} failed: {error}", str(digest))

    async def _ensure(self, digest: Digest, *, background: bool = False
                      ) -> str | Path | None:
        """Have ``digest`` cached (fill it if needed); its path, or None if not kept."""
        path = self.disk.lookup(digest)
        if path is not None:
            return path
        fill, _ = self._join(digest, background=background)
        await fill.done.wait()
        if fill.error is not None:
            raise fill.error
        return fill.final_path

    # -- hits served by worker processes (cache.workers) -------------------------------

    def worker_counts(self, worker: int, hits: int, nbytes: int) -> None:
        """Hits and body bytes worker process ``worker`` served since its last note."""
        m = self.metrics
        m.hits += hits
        m.bytes_served += nbytes
        m.worker_hits[worker] = m.worker_hits.get(worker, 0) + hits
        m.worker_bytes[worker] = m.worker_bytes.get(worker, 0) + nbytes

    def worker_access(self, hex_: str, at: float) -> None:
        """A worker process read object ``hex_`` at ``at`` (unix seconds): the LRU."""
        self.disk.note_access(self._parse_digest(f"{ALGORITHM}:{hex_}"), at)

    # -- invalidate ----------------------------------------------------------------

    async def handle_verify(self, request: web.Request) -> web.Response:
        try:
            digest = Digest.parse(request.match_info["digest"])
        except DigestError as e:
            return _error(400, str(e))
        if digest in self.fills:
            return web.json_response({"digest": str(digest), "status": "filling"})
        path = self.disk.lookup(digest)
        if path is None:
            return web.json_response({"digest": str(digest), "status": "absent"})
        # Only re-hashes count: they are what costs (a whole object read and hashed).
        wait_s = self._verify_limit.retry_after_s(digest, time.monotonic())
        if wait_s > 0:
            return _error(429, f"object {digest} was verified less than "
                          f"{self._verify_limit.interval_s:g} s ago", str(digest),
                          {"Retry-After": str(math.ceil(wait_s))})
        self.disk.pin(digest)
        try:
            got = await asyncio.get_running_loop().run_in_executor(
                self._executor, _hash_file, path)
        except FileNotFoundError:
            got = None
        finally:
            self.disk.unpin(digest)
        if got == digest:
            return web.json_response({"digest": str(digest), "status": "ok"})
        self.disk.drop(digest)
        self.metrics.invalidated += 1
        log.warning("dropped bad cached copy of %s (hashes to %s)", digest, got)
        return web.json_response({"digest": str(digest), "status": "dropped",
                                  "actual": str(got) if got else None})

    # -- refs ----------------------------------------------------------------------

    async def handle_ref(self, request: web.Request) -> web.Response:
        try:
            ref = Ref(request.match_info["namespace"], request.match_info["model"],
                      request.match_info["tag"])
        except BdnError as e:
            return _error(400, str(e))
        now = time.monotonic()
        cached = self._refs.get(ref)
        if cached is not None and cached[1] > now:
            digest = cached[0]
        else:
            try:
                digest = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.store.get_ref, ref)
            except NotFoundError as e:
                return _error(404, str(e))
            except Exception as e:
                return _error(503, f"blob store {self.store.url} unavailable while resolving "
                              f"{ref}: {e}", headers={"Retry-After": str(RETRY_AFTER_S)})
            if len(self._refs) >= MAX_CACHED_REFS:
                self._refs.clear()
            self._refs[ref] = (digest, now + self.options.ref_ttl_s)
        return web.json_response(
            {"ref": str(ref), "digest": str(digest)},
            headers={"Cache-Control": f"max-age={int(self.options.ref_ttl_s)}"})

    # -- prefetch ------------------------------------------------------------------

    # -- JSON bodies of the unauthenticated POST routes ---------------------------------

    async def _json_object(self, request: web.Request) -> dict[str, Any] | None:
        """The request's JSON object, read within the body timeout; None when the body did
        not arrive in time. Raises ValueError for anything but a JSON object."""
        try:
            async with asyncio.timeout(self.options.body_timeout_s):
                body = await request.json()
        except TimeoutError:
            return None
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        return body

    def _body_timeout(self, what: str) -> web.Response:
        return _error(408, f"{what} body not received within "
                      f"{self.options.body_timeout_s:g} s", headers={"Connection": "close"})

    # -- holders (node-to-node sharing) ------------------------------------------------

    async def handle_holders_post(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_object(request)
            if body is None:
                return self._body_timeout("holders")
            agent = _agent_url(body.get("agent"), "agent")
            digests = body.get("digests")
            if not isinstance(digests, list) or len(digests) > MAX_HOLDER_DIGESTS:
                raise ValueError(f'"digests" must be a list of at most '
                                 f"{MAX_HOLDER_DIGESTS} digests")
            keys = [str(Digest.parse(d)) for d in digests]
            receiving = body.get("receiving", False)
            if not isinstance(receiving, bool):
                raise ValueError('"receiving" must be true or false')
        except (ValueError, BdnError) as e:
            return _error(400, f"bad holders request: {e}")
        self.holders.add(agent, keys, time.monotonic(), receiving=receiving)
        return web.Response(status=204)

    async def handle_holders_get(self, request: web.Request) -> web.Response:
        try:
            digest = Digest.parse(request.match_info["digest"])
            exclude = request.query.get("exclude")
            if exclude is not None:
                exclude = _agent_url(exclude, "exclude")
            receiving = request.query.get("receiving", "0")
            if receiving not in ("0", "1"):
                raise ValueError(f'"receiving" must be 0 or 1, got {receiving[:20]!r}')
            if receiving == "1" and exclude is None:
                raise ValueError('"receiving=1" needs "exclude" (the asker\'s URL)')
        except (ValueError, BdnError) as e:
            return _error(400, f"bad holders request: {e}")
        # The lookup is also the asker's "receiving" announcement: one step here, so
        # askers that start at the same instant are ordered (cache/tracker.py).
        found = self.holders.point(str(digest), time.monotonic(), requester=exclude,
                                   receiving=receiving == "1")
        return web.json_response({"digest": str(digest), "holders": list(found.holders),
                                  "receiving": list(found.receiving)})

    async def handle_holders_delete(self, request: web.Request) -> web.Response:
        try:
            digest = Digest.parse(request.match_info["digest"])
            agent = _agent_url(request.query.get("agent"), "agent")
        except (ValueError, BdnError) as e:
            return _error(400, f"bad holders request: {e}")
        self.holders.forget(agent, str(digest))
        return web.Response(status=204)

    async def handle_prefetch(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_object(request)
            if body is None:
                return self._body_timeout("prefetch")
            if "manifest" in body:
                mdigest = Digest.parse(body["manifest"])
            elif "ref" in body:
                ref = Ref.parse(body["ref"])
                mdigest = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.store.get_ref, ref)
            else:
                raise ValueError('want {"manifest": "b3:..."} or {"ref": "ns/model:tag"}')
            peers = check_peers(body.get("peers"))
            me = body.get("self") or ""
            if not isinstance(me, str):
                raise ValueError('"self" must be a URL string')
            me = me.rstrip("/")
            if peers and me not in peers:
                raise ValueError('"self" must be one of "peers"')
        except NotFoundError as e:
            return _error(404, str(e))
        except (ValueError, BdnError) as e:
            return _error(400, f"bad prefetch request: {e}")
        try:
            path = await self._ensure(mdigest)
            data = (Path(path).read_bytes() if path is not None else
                    await asyncio.get_running_loop().run_in_executor(
                        self._executor, self.store.get_manifest_bytes, mdigest))
            manifest = parse_manifest(data, expect=mdigest)
        except NotFoundError as e:
            return _error(404, str(e), str(mdigest))
        except CacheError as e:
            return self._fill_error_response(e, mdigest)
        except BdnError as e:
            return _error(502, f"manifest {mdigest}: {e}", str(mdigest))
        assert self._prefetch_queue is not None
        queued = 0
        queued_bytes = 0
        chunks = manifest.unique_chunks()
        # The one placement every agent uses for this manifest (cache/ring.py).
        placement = place(peers, manifest_objects(manifest)) if peers else None
        for d, chunk in chunks.items():
            if placement is not None and placement.owner(digest_key(d)) != me:
                continue
            if self.disk.lookup(d) is not None or d in self.fills or d in self._prefetch_pending:
                continue
            self._prefetch_pending.add(d)
            self._prefetch_queue.put_nowait(d)
            queued += 1
            queued_bytes += chunk.length
        self.metrics.prefetch_queued += queued
        return web.json_response({"manifest": str(mdigest), "objects": len(chunks),
                                  "queued": queued, "queued_bytes": queued_bytes}, status=202)

    async def _prefetch_worker(self) -> None:
        assert self._prefetch_queue is not None
        while True:
            digest = await self._prefetch_queue.get()
            try:
                await self._ensure(digest, background=True)
            except Exception as e:
                log.warning("prefetch of %s failed: %s", digest, e)
            finally:
                self._prefetch_pending.discard(digest)

    # -- status --------------------------------------------------------------------

    async def handle_healthz(self, request: web.Request) -> web.Response:
        u = self.disk.usage()
        return web.json_response({"ok": True, "store": self.store.url,
                                  "dir": str(self.disk.root), "objects": u.objects,
                                  "used_bytes": u.used_bytes, "budget_bytes": u.budget_bytes,
                                  "fills_in_flight": len(self.fills),
                                  "processes": {str(i): pid for i, pid
                                                in sorted(self.processes.items())}})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        if self.collect_worker_notes is not None:
            await self.collect_worker_notes()
        return prom.metrics_response(self.registry, request)

    def collect_metrics(self) -> Iterator[prom.Metric]:
        """The cache's families (``/metrics``): the owner's counts, in which the worker
        processes' notes are already summed (:meth:`worker_counts`)."""
        m = self.metrics
        u = self.disk.usage()
        yield prom.counter("bdn_cache_hits_total", "Requests served from disk.", value=m.hits)
        yield prom.counter("bdn_cache_misses_total", "Requests that started a fill.",
                           value=m.misses)
        yield prom.counter("bdn_cache_coalesced_waiters_total",
                           "Requests that joined a fill already in flight.", value=m.coalesced)
        yield prom.counter("bdn_cache_bytes_served_total", "Body bytes sent.",
                           value=m.bytes_served)
        yield prom.counter("bdn_cache_bytes_filled_total",
                           "Verified bytes read from the blob store.", value=m.bytes_filled)
        yield prom.counter("bdn_cache_store_object_reads_total",
                           "Object body reads issued to the blob store.",
                           value=self.backend.object_reads)
        yield prom.counter("bdn_cache_evictions_total", "Objects evicted (LRU).",
                           value=self.disk.evictions)
        yield prom.counter("bdn_cache_evicted_bytes_total", "Bytes evicted (LRU).",
                           value=self.disk.evicted_bytes)
        yield prom.counter("bdn_cache_invalidations_total",
                           "Bad copies dropped after a verify request.", value=m.invalidated)
        yield prom.counter("bdn_cache_fill_failures_total", "Fills that failed, by reason.",
                           [({"reason": r}, m.fill_failures.get(r, 0))
                            for r in ("integrity", "not_found", "store", "other")])
        yield prom.histogram("bdn_cache_fill_seconds", "Time from miss to verified object.",
                             FILL_SECONDS_BUCKETS, [({}, m.fill_buckets, m.fill_sum_s)])
        yield prom.gauge("bdn_cache_fills_in_flight", "Fills in progress.",
                         value=len(self.fills))
        yield prom.counter("bdn_cache_prefetch_queued_total",
                           "Objects queued by prefetch requests.", value=m.prefetch_queued)
        yield prom.counter("bdn_cache_prefetch_filled_total",
                           "Objects filled in the background.", value=m.prefetch_filled)
        yield prom.gauge("bdn_cache_prefetch_pending", "Prefetches not yet done.",
                         value=len(self._prefetch_pending))
        yield prom.gauge("bdn_cache_disk_used_bytes", "Bytes of complete objects on disk.",
                         value=u.used_bytes)
        yield prom.gauge("bdn_cache_disk_reserved_bytes", "Bytes reserved by fills.",
                         value=u.reserved_bytes)
        yield prom.gauge("bdn_cache_disk_budget_bytes", "The disk byte budget.",
                         value=u.budget_bytes)
        yield prom.gauge("bdn_cache_objects", "Complete objects on disk.", value=u.objects)
        yield prom.gauge("bdn_cache_processes",
                         "Processes serving the port (the owner and its hit workers).",
                         value=len(self.processes))
        # The owner's share is the total less what the workers noted: the owner counts
        # its own hits only in the totals.
        workers = sorted({*m.worker_hits, *self.processes} - {OWNER_WORKER})
        for name, help_, total, per in (
                ("bdn_cache_process_hits_total", "Hits served, by process (0: the owner).",
                 m.hits, m.worker_hits),
                ("bdn_cache_process_bytes_served_total",
                 "Body bytes sent, by process (0: the owner).", m.bytes_served,
                 m.worker_bytes)):
            yield prom.counter(name, help_, [
                ({"worker": str(OWNER_WORKER)}, total - sum(per.values())),
                *(({"worker": str(w)}, per.get(w, 0)) for w in workers)])


def _hash_file(path: str | Path) -> Digest:
    h = Hasher()
    with open(path, "rb") as f:
        while block := f.read(VERIFY_BLOCK_BYTES):
            h.update(block)
    return h.digest()


async def make_app(options: CacheServerOptions) -> web.Application:
    return CacheServer(options).make_app()


# Kept here for the tests and the bench that read a pod's metrics (cache.server's API).
parse_metrics = prom.parse_metrics


__all__ = ["CacheServer", "CacheServerOptions", "CountingBackend", "make_app",
           "parse_metrics", "parse_range"]

