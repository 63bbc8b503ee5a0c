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

How it is cut: this module builds the aiohttp app, wires the parts and runs their
lifecycle; each route family is its own module with the state only it needs —
:mod:`cache.fills` (single-flight fills from the counted store),
:mod:`cache.serve_objects` (hits and misses of objects and manifests, the fast path's
hit source), :mod:`cache.prefetch`, :mod:`cache.refs`, :mod:`cache.verify`,
:mod:`cache.metrics` (the counts and their families), :mod:`cache.answers` (the error
answers they share) and :mod:`cache.options`. The parts share one disk store, one
:class:`~cache.metrics.Metrics` and one thread pool for store reads and hashing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from bdn import metrics as prom
from bdn.store import BlobStore, open_backend
from cache.answers import body_timeout_response, read_json_object
from cache.answers import error_response as _error  # the holders routes' name for it
from cache.disk import ACCESS_FLUSH_S, DiskOptions, DiskStore
from cache.edge import NegativeCache, check_peers, head_limit_middleware
from cache.fastpath import FastPath
from cache.fill import RateLimiter
from cache.fills import CountingBackend, Fills
from cache.metrics import Metrics, cache_families
from cache.options import CacheServerOptions
from cache.prefetch import Prefetcher
from cache.refs import RefAnswers
from cache.send import OWNER_WORKER, Sender
from cache.send import parse_range as parse_range  # cache.server's API (tests import it)
from cache.serve_objects import ObjectAnswers
from cache.tracker import HolderTracker
from cache.verify import Verifier
from manifests.digest import ALGORITHM, Digest
from manifests.errors import BdnError

# Chunks one holders announcement may name (an agent batches what it verified).
MAX_HOLDER_DIGESTS = 4096

SHUTDOWN_FILL_WAIT_S = 5.0
CLIENT_MAX_BODY_BYTES = 64 * 1024 * 1024


def _agent_url(value: object, field: str) -> str:
    """A holders request's agent URL (the prefetch peers' rules), naming ``field``."""
    try:
        return check_peers([value])[0]
    except ValueError:
        raise ValueError(f'"{field}" must be an http(s):// URL, got {repr(value)[:80]}'
                         ) from None


class CacheServer:
    """The cache service: its parts wired over one disk store, and their lifecycle."""

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
        self._executor = ThreadPoolExecutor(options.fill_threads,
                                            thread_name_prefix="bdn-cache-fill")
        self.sender = Sender(options.send_threads)
        # Unauthenticated routes stay cheap: misses of digests the store lacks are
        # answered from memory for a while; /verify re-hashes an object rarely.
        self.negative = NegativeCache()
        self.fills = Fills(store, self.backend, self.disk, self.metrics, self.negative,
                           self._executor, RateLimiter(options.prefetch_rate_bytes_per_s))
        self.objects = ObjectAnswers(self.disk, self.fills, self.metrics, self.sender,
                                     self.negative)
        self.prefetch = Prefetcher(store, self.fills, self.disk, self.metrics,
                                   self._executor, concurrency=options.prefetch_concurrency,
                                   body_timeout_s=options.body_timeout_s)
        self.refs = RefAnswers(store, self._executor, options.ref_ttl_s)
        self.verifier = Verifier(self.disk, self.fills, self.metrics, self._executor,
                                 options.verify_interval_s)
        self.holders = HolderTracker()
        self._flush_task: asyncio.Task[None] | None = None
        # Serving processes that listen now, index → pid (0: this one; cache.workers),
        # and how to collect their pending notes before /metrics is answered.
        self.processes: dict[int, int] = {OWNER_WORKER: os.getpid()}
        self.collect_worker_notes: Callable[[], Awaitable[None]] | None = None

    # -- lifecycle -----------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=CLIENT_MAX_BODY_BYTES,
                              middlewares=[head_limit_middleware])
        objects = self.objects
        app.router.add_route("GET", "/v1/objects/{digest}", objects.handle_object)
        app.router.add_route("HEAD", "/v1/objects/{digest}", objects.handle_object)
        app.router.add_post("/v1/objects/{digest}/verify", self.verifier.handle_verify)
        app.router.add_route("GET", "/v1/manifests/{digest}", objects.handle_manifest)
        app.router.add_route("HEAD", "/v1/manifests/{digest}", objects.handle_manifest)
        app.router.add_get("/v1/refs/{namespace}/{model}/{tag}", self.refs.handle_ref)
        app.router.add_post("/v1/prefetch", self.prefetch.handle_prefetch)
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
        self.prefetch.start()
        self._flush_task = asyncio.create_task(self._flush_loop())

    async def _on_shutdown(self, app: web.Application) -> None:
        # Before aiohttp waits for in-flight requests: sends to clients that keep
        # reading finish; sends to stalled clients end within SEND_POLL_SLICE_S.
        self.sender.stop()

    async def _on_cleanup(self, app: web.Application) -> None:
        self.sender.stop()
        self.prefetch.stop()
        if self._flush_task:
            self._flush_task.cancel()
        await self.fills.stop(SHUTDOWN_FILL_WAIT_S)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.sender.close()
        self.disk.close()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(ACCESS_FLUSH_S)
            self.disk.flush()
            self.holders.expire(time.monotonic())

    # -- hits answered without aiohttp (cache.fastpath) ------------------------------

    def fast_path(self) -> FastPath:
        """This process's fast path for hits, in front of :meth:`make_app`'s app."""
        return FastPath(self.objects, self.sender, str(OWNER_WORKER), self.options.edge)

    # -- hits served by worker processes (cache.workers) -------------------------------

    def worker_counts(self, worker: int, hits: int, nbytes: int) -> None:
        """Hits and body bytes worker process ``worker`` served since its last note."""
        self.metrics.note_worker(worker, hits, nbytes)

    def worker_access(self, hex_: str, at: float) -> None:
        """A worker process read object ``hex_`` at ``at`` (unix seconds): the LRU."""
        self.disk.note_access(self.objects.parse_digest(f"{ALGORITHM}:{hex_}"), at)

    # -- JSON bodies of the unauthenticated POST routes ---------------------------------

    async def _json_object(self, request: web.Request) -> dict[str, Any] | None:
        return await read_json_object(request, self.options.body_timeout_s)

    def _body_timeout(self, what: str) -> web.Response:
        return body_timeout_response(what, self.options.body_timeout_s)

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
        return cache_families(self.metrics, self.disk,
                              store_object_reads=self.backend.object_reads,
                              fills_in_flight=len(self.fills),
                              prefetch_pending=len(self.prefetch.pending),
                              processes=self.processes)


async def make_app(options: CacheServerOptions) -> web.Application:
    return CacheServer(options).make_app()


# Kept here for the tests and the bench that read a pod's metrics (cache.server's API).
parse_metrics = prom.parse_metrics


__all__ = ["CacheServer", "CacheServerOptions", "make_app", "parse_metrics", "parse_range"]
