"""Object and manifest answers: hits from disk, misses streamed from their fill.

``GET|HEAD /v1/objects/{digest}`` and ``/v1/manifests/{digest}`` (see
:mod:`cache.server` for the HTTP contract). :class:`ObjectAnswers` is also the owner
process's :class:`~cache.fastpath.HitSource`: the fast path asks it to open and pin a
complete object and tells it of each hit, so a hit costs a dict lookup, a pin and an LRU
touch whichever path answers it. What it cannot answer from disk it answers from the
object's one fill (:mod:`cache.fills`), sending each byte as it is written and the last
byte of a range only once the fill is verified; ``only-if-cached`` and the negative
cache keep such a miss from becoming a store read where it must not.

The ``Range``, ``If-None-Match`` and header rules are :mod:`cache.send`'s, shared with
the fast path and the hit workers, so every path gives the same answer.
"""

from __future__ import annotations

import time
from typing import BinaryIO

from aiohttp import web

from cache.answers import error_response, fill_error_response, retry_later
from cache.disk import DiskStore
from cache.edge import NegativeCache
from cache.fastpath import OpenObject, answer_hit, if_none_match
from cache.fill import Fill
from cache.fills import Fills
from cache.metrics import Metrics
from cache.send import (
    OCTET_STREAM,
    OWNER_WORKER,
    Sender,
    abort,
    not_modified,
    object_headers,
    prepare_range,
)
from manifests.digest import ALGORITHM, Digest
from manifests.errors import DigestError

MAX_CACHED_DIGESTS = 100_000


def only_if_cached(request: web.Request) -> bool:
    """Whether the request carries ``Cache-Control: only-if-cached`` (RFC 9111
    §5.2.1.7): answer from what is cached (or a fill already in flight, which costs no
    further store read), else 504 — never start a fill."""
    return any(d.strip().lower() == "only-if-cached"
               for v in request.headers.getall("Cache-Control", [])
               for d in v.split(","))


def _headers(digest: Digest, content_type: str, state: str) -> dict[str, str]:
    return object_headers(str(digest), content_type, state, str(OWNER_WORKER))


class ObjectAnswers:
    """The owner's object answers over ``disk``, joining ``fills`` on a miss."""

    # The owner's pins are its own bookkeeping, released when the response ends.
    hooks_last_byte = False

    def __init__(self, disk: DiskStore, fills: Fills, metrics: Metrics, sender: Sender,
                 negative: NegativeCache) -> None:
        self.disk = disk
        self.fills = fills
        self.metrics = metrics
        self.sender = sender
        self.negative = negative
        self._digests: dict[str, Digest] = {}

    def parse_digest(self, text: str) -> Digest:
        """``Digest.parse``, remembered: hot objects are asked for over and over."""
        d = self._digests.get(text)
        if d is None:
            d = Digest.parse(text)
            if len(self._digests) >= MAX_CACHED_DIGESTS:
                self._digests.clear()
            self._digests[text] = d
        return d

    async def handle_object(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, OCTET_STREAM)

    async def handle_manifest(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "application/json")

    async def _serve(self, request: web.Request, content_type: str) -> web.StreamResponse:
        try:
            digest = self.parse_digest(request.match_info["digest"])
        except DigestError as e:
            return error_response(400, str(e))
        try:
            obj = self._open(digest)
        except FileNotFoundError:
            self.metrics.hits += 1
            self.disk.drop(digest)
            return retry_later(f"object {digest} vanished from the cache disk; retry",
                               str(digest))
        except OSError as e:  # EMFILE and the like: this process is out of something
            return retry_later(f"cannot open object {digest} now ({e.strerror}); retry",
                               str(digest))
        if obj is not None:
            headers = _headers(digest, content_type, "hit")
            return await answer_hit(request, self, self.sender, obj, digest.hex, headers)
        if digest not in self.fills and self.negative.absent(digest, time.monotonic()):
            return error_response(
                404, f"object {digest} not found in blob store {self.fills.store.url} "
                f"(looked up less than {self.negative.ttl_s:g} s ago)", str(digest))
        if digest not in self.fills and only_if_cached(request):
            # Not the pod asked to fill this object (a hedge, or a second ask): a miss
            # here must not become a second store read of it.
            return error_response(
                504, f"object {digest} is not cached here (only-if-cached)", str(digest))
        fill, state = self.fills.join(digest)
        return await self._serve_fill(request, fill, content_type, state)

    # -- the fast path's HitSource (cache.fastpath) ---------------------------------

    def open_hit(self, hex_: str) -> OpenObject | None:
        try:
            return self._open(self.parse_digest(f"{ALGORITHM}:{hex_}"))
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

    # -- misses, streamed from their fill ------------------------------------------

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
                return fill_error_response(fill.error, digest)
            size = fill.size
            assert size is not None
            headers = _headers(digest, content_type, state)
            if not_modified(if_none_match(request), headers["ETag"]):
                return web.Response(status=304, headers=headers)
            prep = prepare_range(request, str(digest), size, headers)
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
