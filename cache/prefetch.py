"""``POST /v1/prefetch``: fill a manifest's objects in the background, before anyone
asks for them.

A deploy (or an agent that is about to pull) names a manifest or a ref; the pod reads
the manifest through its own cache and queues a background fill for each object it does
not have, is not filling and has not queued yet. With ``"peers"`` and ``"self"`` each
pod keeps only the objects it owns on the ring (:mod:`cache.ring`, the same placement
every agent uses), so a fleet prefetches every object once. A few workers drain the
queue; their fills are background fills (:mod:`cache.fills`): rate limited, and lifted
to full speed the moment a request joins one, so a prefetch never slows a pull.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from bdn.errors import NotFoundError
from bdn.store import BlobStore
from cache.answers import (
    body_timeout_response,
    error_response,
    fill_error_response,
    read_json_object,
)
from cache.disk import DiskStore
from cache.edge import check_peers
from cache.errors import CacheError
from cache.fills import Fills
from cache.metrics import Metrics
from cache.ring import digest_key, manifest_objects, place
from manifests.digest import Digest
from manifests.errors import BdnError
from manifests.manifest import parse_manifest
from manifests.refs import Ref

log = logging.getLogger(__name__)


class Prefetcher:
    """The prefetch queue of one pod and the ``concurrency`` workers that drain it."""

    def __init__(self, store: BlobStore, fills: Fills, disk: DiskStore, metrics: Metrics,
                 executor: ThreadPoolExecutor, *, concurrency: int,
                 body_timeout_s: float) -> None:
        self.store = store
        self.fills = fills
        self.disk = disk
        self.metrics = metrics
        self.concurrency = concurrency
        self.body_timeout_s = body_timeout_s
        # Queued or filling: each object is queued once however many requests name it.
        self.pending: set[Digest] = set()
        self._executor = executor
        self._queue: asyncio.Queue[Digest] | None = None
        self._workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the workers (on the running loop)."""
        self._queue = asyncio.Queue()
        self._workers = [asyncio.create_task(self._worker())
                         for _ in range(self.concurrency)]

    def stop(self) -> None:
        for t in self._workers:
            t.cancel()

    async def handle_prefetch(self, request: web.Request) -> web.Response:
        try:
            body = await read_json_object(request, self.body_timeout_s)
            if body is None:
                return body_timeout_response("prefetch", self.body_timeout_s)
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
            return error_response(404, str(e))
        except (ValueError, BdnError) as e:
            return error_response(400, f"bad prefetch request: {e}")
        try:
            path = await self.fills.ensure(mdigest)
            data = (Path(path).read_bytes() if path is not None else
                    await asyncio.get_running_loop().run_in_executor(
                        self._executor, self.store.get_manifest_bytes, mdigest))
            manifest = parse_manifest(data, expect=mdigest)
        except NotFoundError as e:
            return error_response(404, str(e), str(mdigest))
        except CacheError as e:
            return fill_error_response(e, mdigest)
        except BdnError as e:
            return error_response(502, f"manifest {mdigest}: {e}", str(mdigest))
        assert self._queue is not None
        queued = 0
        queued_bytes = 0
        chunks = manifest.unique_chunks()
        # The one placement every agent uses for this manifest (cache/ring.py).
        placement = place(peers, manifest_objects(manifest)) if peers else None
        for d, chunk in chunks.items():
            if placement is not None and placement.owner(digest_key(d)) != me:
                continue
            if self.disk.lookup(d) is not None or d in self.fills or d in self.pending:
                continue
            self.pending.add(d)
            self._queue.put_nowait(d)
            queued += 1
            queued_bytes += chunk.length
        self.metrics.prefetch_queued += queued
        return web.json_response({"manifest": str(mdigest), "objects": len(chunks),
                                  "queued": queued, "queued_bytes": queued_bytes}, status=202)

    async def _worker(self) -> None:
        assert self._queue is not None
        while True:
            digest = await self._queue.get()
            try:
                await self.fills.ensure(digest, background=True)
            except Exception as e:
                log.warning("prefetch of %s failed: %s", digest, e)
            finally:
                self.pending.discard(digest)
