"""``GET /v1/refs/{namespace}/{model}/{tag}``: refs resolved through the pod, briefly
remembered.

Refs move (a tag is re-pointed at a new manifest), so unlike objects they are cached
only for ``ref_ttl_s``: long enough that a scale-up of many nodes asking at once costs
the store one read, short enough to bound how stale a scale-up can be. The answer
carries the same bound as ``Cache-Control: max-age``.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from bdn.errors import NotFoundError
from bdn.store import BlobStore
from cache.answers import error_response, retry_later
from manifests.digest import Digest
from manifests.errors import BdnError
from manifests.refs import Ref

MAX_CACHED_REFS = 10_000


class RefAnswers:
    """Refs of ``store``, each resolved at most once per ``ttl_s``."""

    def __init__(self, store: BlobStore, executor: ThreadPoolExecutor, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._executor = executor
        self._refs: dict[Ref, tuple[Digest, float]] = {}

    async def handle_ref(self, request: web.Request) -> web.Response:
        try:
            ref = Ref(request.match_info["namespace"], request.match_info["model"],
                      request.match_info["tag"])
        except BdnError as e:
            return error_response(400, str(e))
        now = time.monotonic()
        cached = self._refs.get(ref)
        if cached is not None and cached[1] > now:
            digest = cached[0]
        else:
            try:
                digest = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.store.get_ref, ref)
            except NotFoundError as e:
                return error_response(404, str(e))
            except Exception as e:
                return retry_later(f"blob store {self.store.url} unavailable while "
                                   f"resolving {ref}: {e}")
            if len(self._refs) >= MAX_CACHED_REFS:
                self._refs.clear()
            self._refs[ref] = (digest, now + self.ttl_s)
        return web.json_response(
            {"ref": str(ref), "digest": str(digest)},
            headers={"Cache-Control": f"max-age={int(self.ttl_s)}"})
