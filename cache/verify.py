"""``POST /v1/objects/{digest}/verify``: re-hash a cached copy and drop it if bad.

An agent that received bytes which did not match their digest asks the pod that sent
them to look at its own copy. The route is unauthenticated and a re-hash reads and
hashes a whole object, so each object is re-hashed at most once per
``verify_interval_s`` (sooner: 429 with ``Retry-After``); answers that cost nothing —
the object is being filled (a fill verifies itself) or is not cached — are not limited.
The hash runs on the server's thread pool with the object pinned, so eviction cannot
remove the file under it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from cache.answers import error_response
from cache.disk import DiskStore
from cache.edge import PerKeyRateLimit
from cache.fills import Fills
from cache.metrics import Metrics
from manifests.digest import Digest, Hasher
from manifests.errors import DigestError

log = logging.getLogger(__name__)

VERIFY_BLOCK_BYTES = 4 * 1024 * 1024


def hash_file(path: str | Path) -> Digest:
    h = Hasher()
    with open(path, "rb") as f:
        while block := f.read(VERIFY_BLOCK_BYTES):
            h.update(block)
    return h.digest()


class Verifier:
    """Re-hashes copies on ``disk`` at most once per ``interval_s`` each."""

    def __init__(self, disk: DiskStore, fills: Fills, metrics: Metrics,
                 executor: ThreadPoolExecutor, interval_s: float) -> None:
        self.disk = disk
        self.fills = fills
        self.metrics = metrics
        self._executor = executor
        self._limit = PerKeyRateLimit(interval_s)

    async def handle_verify(self, request: web.Request) -> web.Response:
        try:
            digest = Digest.parse(request.match_info["digest"])
        except DigestError as e:
            return error_response(400, str(e))
        if digest in self.fills:
            return web.json_response({"digest": str(digest), "status": "filling"})
        path = self.disk.lookup(digest)
        if path is None:
            return web.json_response({"digest": str(digest), "status": "absent"})
        # Only re-hashes count: they are what costs (a whole object read and hashed).
        wait_s = self._limit.retry_after_s(digest, time.monotonic())
        if wait_s > 0:
            return error_response(429, f"object {digest} was verified less than "
                                  f"{self._limit.interval_s:g} s ago", str(digest),
                                  {"Retry-After": str(math.ceil(wait_s))})
        self.disk.pin(digest)
        try:
            got = await asyncio.get_running_loop().run_in_executor(
                self._executor, hash_file, path)
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
