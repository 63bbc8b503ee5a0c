"""The agent's peer listener: verified chunks from this node's cache, for other agents.

``bdn agent --peer-listen HOST:PORT`` (port 7471 by convention, named ``peer`` in the
DaemonSet) serves::

    GET|HEAD /v1/objects/{digest}          one chunk's bytes; Range (206/416), sendfile
    POST     /v1/objects/{digest}/verify   re-hash this node's copy; forget it if bad
    GET      /healthz                      "ok"

with the cluster cache's object semantics (the same helpers, :mod:`cache.send`), so a
requesting agent's fetcher cannot tell a peer agent from a cache pod except by the tier
it counts the bytes under (``peer``).

What is served, and why it is safe to serve it:

* Only content-addressed chunks the node cache indexed as verified (in a complete file
  or journaled in a partial one) — never a path, never a file of a mount: the URL names
  a digest, the node cache says where its verified bytes lie, and the bytes are read
  from the node cache's own files. A digest the node does not hold is 404.
* A chunk this node is still *receiving* (the owning pod points requesters at
  receivers, :mod:`cache.tracker`) is waited for when the requester asks to
  (``X-Bdn-Wait-S: seconds``, at most :data:`MAX_RECEIVING_WAIT_S`): once it is
  verified and journaled it is served as above; if the receive fails, or is not done
  within the wait, the answer is 404 at once, so the requester asks the pods. Waiting
  requesters hold no upload slot; at most ``max_uploads`` × :data:`WAITERS_PER_UPLOAD`
  wait at once (more: 503).
* The requester verifies every byte anyway (a chunk evicted and its file reused between
  lookup and send would fail that check and be asked elsewhere).
* Bounded: at most ``max_uploads`` transfers at once (more: ``503`` with
  ``Retry-After``, which the requester answers by asking its next source first) and at
  most ``upload_rate_bytes_per_s`` on average, so serving peers never starves this
  node's own pulls or its replicas' traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3
from aiohttp import web

from agent.options import PEER_MAX_UPLOADS
from cache.edge import VERIFY_INTERVAL_S, PerKeyRateLimit
from cache.node import NodeCache
from cache.send import (
    OCTET_STREAM,
    Sender,
    object_headers,
    prepare_range,
    send_file_response,
)
from manifests.digest import Digest
from manifests.errors import DigestError

log = logging.getLogger(__name__)

MAX_UPLOADS = PEER_MAX_UPLOADS
# Send threads: a few, as the cache's (sendfile on the loop first, the rest on these).
PEER_SEND_THREADS = 4
BUSY_RETRY_AFTER_S = 1
# 0: no rate limit.
UPLOAD_RATE_BYTES_PER_S = 0
# The longest a requester may have us wait for a chunk we are still receiving.
MAX_RECEIVING_WAIT_S = 60.0
# Requesters that may wait on receives at once, per upload slot.
WAITERS_PER_UPLOAD = 4
WAIT_HEADER = "X-Bdn-Wait-S"

# The chunk this node is receiving now, as a future resolved once it is verified and
# journaled (the engine's in-flight record); None when it is not receiving it.
ReceivingFn = Callable[[Digest], "asyncio.Future[Any] | None"]


@dataclass(frozen=True)
class PeerServerOptions:
    max_uploads: int = MAX_UPLOADS
    upload_rate_bytes_per_s: int = UPLOAD_RATE_BYTES_PER_S

    def __post_init__(self) -> None:
        if not 1 <= self.max_uploads <= 4096:
            raise ValueError(f"PeerServerOptions.max_uploads must be in [1, 4096], got "
                             f"{self.max_uploads}")
        if self.upload_rate_bytes_per_s < 0:
            raise ValueError("PeerServerOptions.upload_rate_bytes_per_s must be ≥ 0 "
                             "(0: unlimited)")


def _wait_s(value: str | None) -> float:
    """The requester's ``X-Bdn-Wait-S``: seconds within [0, MAX_RECEIVING_WAIT_S]; 0 when
    absent or not a number (then a chunk being received is simply not held yet)."""
    if value is None:
        return 0.0
    try:
        wait = float(value)
    except ValueError:
        return 0.0
    if wait != wait:  # NaN
        return 0.0
    return max(0.0, min(MAX_RECEIVING_WAIT_S, wait))


class _Pacer:
    """An async token bucket over bytes: the average upload rate, bursts of one chunk."""

    def __init__(self, rate_bytes_per_s: int) -> None:
        self.rate = float(rate_bytes_per_s)
        self._tokens = 0.0
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:  # one waiter at a time: first come, first paced
            now = time.monotonic()
            burst = max(float(n), self.rate / 10)
            self._tokens = min(burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < n:
                # Pacing is the point of this wait (a rate, not a synchronisation).
                await asyncio.sleep((n - self._tokens) / self.rate)
                self._tokens = float(n)
                self._at = time.monotonic()
            self._tokens -= n


class PeerServer:
    """Serves this node's verified chunks (see module docstring)."""

    def __init__(self, node: NodeCache, options: PeerServerOptions | None = None,
                 counters: dict[str, int] | None = None,
                 receiving: ReceivingFn | None = None) -> None:
        self.node = node
        self.receiving = receiving
        self._waiters = 0
        self.options = options or PeerServerOptions()
        self.sender = Sender(PEER_SEND_THREADS)
        self._uploads = 0
        self._pacer = _Pacer(self.options.upload_rate_bytes_per_s)
        self._verify_limit = PerKeyRateLimit(VERIFY_INTERVAL_S)
        # The engine's counters when given, so /metrics shows these beside the pulls'.
        self.counters = counters if counters is not None else {}
        for name in ("peer_uploads", "peer_upload_bytes", "peer_busy_answers",
                     "peer_missing_answers", "peer_copies_dropped",
                     "peer_receiving_waits", "peer_uploads_after_wait"):
            self.counters.setdefault(name, 0)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1024)
        app.router.add_route("GET", "/v1/objects/{digest}", self.handle_object)
        app.router.add_route("HEAD", "/v1/objects/{digest}", self.handle_object)
        app.router.add_post("/v1/objects/{digest}/verify", self.handle_verify)
        app.router.add_get("/healthz", self.handle_healthz)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.sender.stop()

    def close(self) -> None:
        self.sender.close()

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def handle_verify(self, request: web.Request) -> web.Response:
        """A requester found our bytes bad: re-hash them (rate limited per digest, as
        the cache does) and stop serving and reusing the copy if they are."""
        try:
            digest = Digest.parse(request.match_info["digest"])
        except DigestError as e:
            return web.json_response({"error": str(e)}, status=400)
        loc = self.node.chunk_location(digest)
        if loc is None:
            return web.json_response({"digest": str(digest), "status": "absent"})
        wait_s = self._verify_limit.retry_after_s(digest, time.monotonic())
        if wait_s > 0:
            return web.json_response(
                {"error": f"{digest} was verified recently", "digest": str(digest)},
                status=429, headers={"Retry-After": str(max(1, round(wait_s)))})
        path = self.node.location_path(loc)

        def rehash() -> str | None:
            try:
                with open(path, "rb") as f:
                    f.seek(loc.offset)
                    return f"b3:{blake3.blake3(f.read(loc.length)).hexdigest()}"
            except FileNotFoundError:
                return None

        got = await asyncio.get_running_loop().run_in_executor(None, rehash)
        if got == str(digest):
            return web.json_response({"digest": str(digest), "status": "ok"})
        self.node.unmark_chunk(digest, loc)
        self.counters["peer_copies_dropped"] += 1
        log.warning("peer copy of %s at %s hashes to %s; no longer served", digest, path, got)
        return web.json_response({"digest": str(digest), "status": "dropped",
                                  "actual": got})

    async def _wait_received(self, digest: Digest, fut: asyncio.Future[Any],
                             wait_s: float) -> str | None:
        """Wait (at most ``wait_s``) for the receive of ``digest`` to end; None once it
        verified, else why it will not be served (the requester asks elsewhere)."""
        self._waiters += 1
        self.counters["peer_receiving_waits"] += 1
        try:
            # shield: a requester that gives up must not cancel our own receive.
            await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except TimeoutError:
            return f"{digest} is still being received here after {wait_s:g} s"
        except Exception as e:  # the receive failed: this node will not hold it
            return f"the receive of {digest} here failed: {type(e).__name__}"
        finally:
            self._waiters -= 1
        return None

    async def handle_object(self, request: web.Request) -> web.StreamResponse:
        try:
            digest = Digest.parse(request.match_info["digest"])
        except DigestError as e:
            return web.json_response({"error": str(e)}, status=400)
        loc = self.node.chunk_location(digest)
        waited = False
        if loc is None:
            fut = self.receiving(digest) if self.receiving is not None else None
            wait_s = _wait_s(request.headers.get(WAIT_HEADER))
            if fut is None or wait_s <= 0:
                self.counters["peer_missing_answers"] += 1
                return web.json_response({"error": f"this node holds no verified {digest}",
                                          "digest": str(digest)}, status=404)
            if self._waiters >= self.options.max_uploads * WAITERS_PER_UPLOAD:
                self.counters["peer_busy_answers"] += 1
                return web.json_response(
                    {"error": f"{self._waiters} requesters wait on receives here"},
                    status=503, headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})
            gone = await self._wait_received(digest, fut, wait_s)
            if gone is not None:
                self.counters["peer_missing_answers"] += 1
                return web.json_response({"error": gone, "digest": str(digest)},
                                         status=404)
            loc = self.node.chunk_location(digest)
            if loc is None:
                self.counters["peer_missing_answers"] += 1
                return web.json_response({"error": f"{digest} was received but is no "
                                          "longer held here", "digest": str(digest)},
                                         status=404)
            waited = True
        if self._uploads >= self.options.max_uploads:
            self.counters["peer_busy_answers"] += 1
            return web.json_response(
                {"error": f"{self.options.max_uploads} uploads in progress"}, status=503,
                headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})
        headers = object_headers(str(digest), OCTET_STREAM, "peer", "peer")
        prepared = prepare_range(request, str(digest), loc.length, headers)
        if isinstance(prepared, web.Response):
            return prepared
        status, start, end = prepared
        try:
            f = open(self.node.location_path(loc), "rb")
        except FileNotFoundError:
            # Evicted or published between the lookup and the open: not held any more.
            return web.json_response({"error": f"{digest} is no longer held here",
                                      "digest": str(digest)}, status=404)
        self._uploads += 1
        try:
            if request.method != "HEAD":
                await self._pacer.take(end - start)
            _resp, whole = await send_file_response(
                request, self.sender, f, status, loc.offset + start, loc.offset + end,
                headers)
            if whole and request.method != "HEAD":
                self.counters["peer_uploads"] += 1
                self.counters["peer_upload_bytes"] += end - start
                if waited:
                    self.counters["peer_uploads_after_wait"] += 1
            return _resp
        finally:
            self._uploads -= 1
            with contextlib.suppress(OSError):
                f.close()
