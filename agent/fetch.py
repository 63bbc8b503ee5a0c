"""Fetching one chunk's verified bytes into memory: cache peers, then the blob store.

Tier order for a chunk: the peers in ring order for its digest (the owner first, so
the cluster cache fills each object on one pod), then — unless strict — the blob store.
A round tries each tier once; rounds are spaced by the retry policy's backoff. A peer
whose bytes do not verify is reported bad and skipped for the rest of that chunk.

Why blocking threads and ``http.client`` rather than asyncio: on this path Python's
per-byte cost decides throughput. ``HTTPResponse.readinto`` receives straight into a
reusable buffer (``recv_into``: no intermediate ``bytes``), and ``os.pwrite`` and BLAKE3
release the GIL, so a few worker threads overlap network, hashing and page-cache writes
on all cores. The asyncio daemon submits chunk jobs to a pool of ``max_connections``
threads, so the thread count *is* the connection cap; bytes in flight are capped by
the caller (``agent/engine.py``) before a job is submitted.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import blake3
import xxhash
import zstandard

from agent.errors import FetchError, StrictOriginError
from agent.options import AgentOptions
from bdn.errors import NotFoundError
from bdn.store import BlobStore, object_key
from manifests.digest import Digest
from manifests.errors import IntegrityError
from manifests.manifest import ENCODING_RAW, Chunk

log = logging.getLogger(__name__)

OBJECTS_PATH = "/v1/objects/"
BUFFER_GRAIN_BYTES = 1024 * 1024
# A pool keeps this many idle buffers of one size class; beyond, they are freed.
MAX_IDLE_BUFFERS_PER_SIZE = 32

OwnersFn = Callable[[Digest], Sequence[str]]


def verify_chunk_bytes(chunk: Chunk, view: memoryview, where: str) -> None:
    """BLAKE3 on this thread only: fetch threads already run one per connection, and
    spreading each 16 MiB hash over a shared pool only adds hand-offs on a busy node."""
    actual = blake3.blake3(view, max_threads=1).hexdigest()
    if actual != chunk.digest.hex:
        raise IntegrityError(str(chunk.digest), f"b3:{actual}", where=where)


def rendezvous_order(peers: Sequence[str], digest: Digest) -> list[str]:
    """Peers by highest-random-weight for ``digest`` (the owner first); pure.

    Used only when the cluster cache's own ring client (``cache/client.py``) is absent;
    with it, its ``owners`` decides, so agent and cache agree on placement.
    """
    return sorted(peers, key=lambda p: xxhash.xxh3_64_intdigest(f"{p}|{digest.hex}"),
                  reverse=True)


class BufferPool:
    """Reusable receive buffers: fresh pages cost a fault each, reused ones do not."""

    def __init__(self) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()

    def get(self, n: int) -> bytearray:
        size = max(BUFFER_GRAIN_BYTES, -(-n // BUFFER_GRAIN_BYTES) * BUFFER_GRAIN_BYTES)
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        with self._lock:
            free = self._free.setdefault(len(buf), [])
            if len(free) < MAX_IDLE_BUFFERS_PER_SIZE:
                free.append(buf)


@dataclass
class FetchResult:
    tier: str                       # "cluster" or "store"
    peer: str | None
    bad_peers: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class _HTTPStatus(Exception):
    def __init__(self, status: int, peer: str) -> None:
        super().__init__(f"{peer} answered HTTP {status}")
        self.status = status


class Fetcher:
    """Fetches chunks into buffers and verifies them. Safe to call from many threads."""

    def __init__(self, options: AgentOptions, store: BlobStore | None,
                 owners: OwnersFn | None = None) -> None:
        self.options = options
        self.store = store
        self._owners = owners or (lambda d: rendezvous_order(options.peers, d))
        self._local = threading.local()
        self._rng = random.Random()

    # -- connections -----------------------------------------------------------------

    def _conn(self, peer: str) -> http.client.HTTPConnection:
        conns: dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "conns", {})
        conn = conns.get(peer)
        if conn is None:
            parts = urlsplit(peer)
            cls = (http.client.HTTPSConnection if parts.scheme == "https"
                   else http.client.HTTPConnection)
            conn = cls(parts.hostname or "127.0.0.1", parts.port,
                       timeout=self.options.connect_timeout_s)
            conns[peer] = conn
        return conn

    def _drop(self, peer: str) -> None:
        conns = self._local.__dict__.get("conns", {})
        conn = conns.pop(peer, None)
        if conn is not None:
            conn.close()

    def close_thread_connections(self) -> None:
        for peer in list(self._local.__dict__.get("conns", {})):
            self._drop(peer)

    # -- one chunk -------------------------------------------------------------------

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> FetchResult:
        """Fill ``buf[:chunk.length]`` with the chunk's verified bytes (blocking)."""
        view = buf[:chunk.length]
        result = FetchResult(tier="", peer=None)
        bad: set[str] = set()
        policy = self.options.retry
        for attempt in range(1, policy.attempts + 1):
            for peer in self._owners(chunk.digest):
                if peer in bad:
                    continue
                try:
                    self._from_peer(peer, chunk, view)
                    verify_chunk_bytes(chunk, view, f"chunk from cache peer {peer}")
                except IntegrityError as e:
                    bad.add(peer)
                    result.bad_peers.append(peer)
                    result.failures.append(str(e))
                    log.warning("%s", e)
                    continue
                except (OSError, http.client.HTTPException, _HTTPStatus, ValueError) as e:
                    self._drop(peer)
                    result.failures.append(f"{peer}: {type(e).__name__}: {e}")
                    continue
                result.tier, result.peer = "cluster", peer
                return result
            if self.store is not None and not self.options.strict:
                try:
                    self._from_store(chunk, view)
                    verify_chunk_bytes(chunk, view, f"chunk from blob store {self.store.url}")
                    result.tier = "store"
                    return result
                except (OSError, NotFoundError, IntegrityError, ValueError) as e:
                    result.failures.append(f"store: {type(e).__name__}: {e}")
            if attempt < policy.attempts:
                time.sleep(policy.delay_s(attempt, draw=self._rng.random()))
        tried = "; ".join(result.failures[-6:]) or "no tier configured"
        if self.options.strict:
            raise StrictOriginError(
                f"strict mode: no cache peer delivered chunk {chunk.digest} after "
                f"{policy.attempts} rounds and the blob store may not be used ({tried})",
                digest=str(chunk.digest), attempts=tuple(result.failures))
        raise FetchError(f"no tier delivered chunk {chunk.digest} after {policy.attempts} "
                         f"rounds ({tried})", digest=str(chunk.digest),
                         attempts=tuple(result.failures))

    def _from_peer(self, peer: str, chunk: Chunk, view: memoryview) -> None:
        conn = self._conn(peer)
        path = urlsplit(peer).path.rstrip("/") + OBJECTS_PATH + str(chunk.digest)
        conn.request("GET", path, headers={"Range": f"bytes=0-{chunk.length - 1}",
                                           "Accept-Encoding": "identity"})
        if conn.sock is not None:
            conn.sock.settimeout(self.options.read_timeout_s)
        resp = conn.getresponse()
        if resp.status not in (200, 206):
            resp.read(64 * 1024)
            if resp.will_close:
                self._drop(peer)
            raise _HTTPStatus(resp.status, peer)
        encoding = (resp.getheader("Content-Encoding") or "").lower()
        if encoding in ("zstd", "zst"):
            data = zstandard.ZstdDecompressor().decompress(resp.read(),
                                                           max_output_size=chunk.length)
            if len(data) != chunk.length:
                raise ValueError(f"decoded {len(data)} bytes, want {chunk.length}")
            view[:] = data
            return
        length = resp.getheader("Content-Length")
        if length is not None and int(length) != chunk.length:
            resp.close()
            self._drop(peer)
            raise ValueError(f"{peer} sent {length} bytes for a chunk of {chunk.length}")
        got = 0
        while got < chunk.length:
            n = resp.readinto(view[got:])
            if not n:
                self._drop(peer)
                raise ValueError(f"{peer} ended the body after {got} of {chunk.length} bytes")
            got += n
        # Consume the (empty) rest so the connection can be reused.
        with contextlib.suppress(Exception):
            resp.read()

    def _from_store(self, chunk: Chunk, view: memoryview) -> None:
        assert self.store is not None
        info = self.store.stat_object(chunk.digest)
        if info is None:
            raise NotFoundError(f"object {chunk.digest} not in store {self.store.url}",
                                url=self.store.url, key=str(chunk.digest))
        got = 0
        if info.encoding == ENCODING_RAW:
            with self.store.backend.open(object_key(chunk.digest)) as f:
                while got < chunk.length:
                    n = f.readinto(view[got:])  # type: ignore[attr-defined]
                    if not n:
                        break
                    got += n
        else:
            for block in self.store.iter_object(chunk.digest):
                end = min(chunk.length, got + len(block))
                view[got:end] = block[:end - got]
                got = end
        if got != chunk.length:
            raise ValueError(f"store object {chunk.digest} holds {got} bytes, want "
                             f"{chunk.length}")
