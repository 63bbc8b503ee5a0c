"""Fetching one chunk's verified bytes into memory: cache peers, then the blob store.

Sources for a chunk: the peers in ring order for its digest (the owner first, so the
cluster cache fills each object on one pod), then — unless strict — the blob store.
Which source to ask next, and when, is decided by the pure policy in
``agent/fetchpolicy.py`` from the answers so far and the peers under suspicion: a
corrupt or truncated answer is reported to the peer that sent it (through
``on_answer``, before the chunk is asked again, so the cache can drop its bad copy
first) and the chunk is asked of the next peer, then the store, then the same peer
again, up to a bounded number of tries; a ``503`` with ``Retry-After`` is waited out
within a bounded total wait. When the budget is spent the error names the chunk, every
source asked and what each answered.

No hung peer stalls a chunk: each request has a connect timeout, a first-byte deadline
(the response head: ``first_byte_timeout_s``, raised to what heads take when links are
full, :class:`agent.fetchpolicy.HeadLatency`) and a stall detector (no byte for a period
derived from the throughput seen so far, :func:`agent.fetchpolicy.stall_timeout_s`).
Past the first-byte deadline the request is *hedged*: the same chunk is asked of the
next untried peer and whichever starts answering first is read, the other cancelled (its
connection closed). A stalled transfer is abandoned and re-asked at once. Either way a
peer that sent nothing on any connection for a deadline is suspected across chunks
(:class:`cache.suspicion.Suspicion`); silent for two, it is hung, and every other
request in flight to it is cut off at once (:meth:`Fetcher._declare_hung`) — one
verdict per agent, not one deadline per thread. A suspected peer is probed with
``GET /healthz`` on a thread beside the pulls, never with a chunk.

Hedging never costs a second store read. Only one pod may fill a chunk — its owner, or
once the owner is suspected or passed over, the next in placement order
(:func:`agent.fetchpolicy.filler`); a hedge or re-ask to any other pod carries
``Cache-Control: only-if-cached`` and is answered from that pod's cache or 504. After
such a 504 the owner is still the one to fill it, so it is waited for a while longer:
one more first-byte deadline, and beyond that for as long as it shows it is alive (a
byte from it on any connection within the last deadline — a loaded pod keeps sending,
a hung one sends nothing), up to the read timeout. Likewise a deadline missed by a pod
that is sending on other connections does not make it suspected, nor does a body that
does not start after its head (the pod waits on its store for the fill it streams):
under load it is slow, not hung, and moving its chunks to the next pod would only fill
them twice. Such a chunk is re-asked: the other pods only-if-cached, then the owner.

With node-to-node sharing on, the owning pod may point this agent at peer agents that
hold the chunk or are still *receiving* it (:mod:`cache.tracker`; the lookup also
records this agent as receiving it, so agents that start at once form a tree). A
receiver is asked to wait for the chunk (``X-Bdn-Wait-S``,
:func:`agent.fetchpolicy.receiver_wait_s`) and answers once it verified it, or 404 at
once if its receive failed; its first-byte deadline is that much longer, and past it
the chunk is hedged with the pods as for any peer. Every byte is verified here.

Why blocking threads and ``http.client`` rather than asyncio: on this path Python's
per-byte cost decides throughput. ``HTTPResponse.readinto`` receives straight into a
reusable buffer (``recv_into``: no intermediate ``bytes``), and ``os.pwrite`` and BLAKE3
release the GIL, so a few worker threads overlap network, hashing and page-cache writes
on all cores. The asyncio daemon submits chunk jobs to a pool of ``max_connections``
threads, so the thread count *is* the connection cap; bytes in flight are capped by
the caller (``agent/engine.py``) before a job is submitted, and the receive buffers'
pool keeps at most that many bytes (:class:`BufferPool`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import blake3
import zstandard

from agent.errors import FetchError, StrictOriginError
from agent.fetchpolicy import (
    BUSY,
    CORRUPT,
    ERROR,
    MISSING,
    OK,
    RECEIVER_WAIT_FLOOR_S,
    STORE,
    SUSPICIOUS,
    TIMEOUT,
    TRUNCATED,
    UNCACHED,
    Answer,
    HeadLatency,
    Suspicion,
    filler,
    next_source,
    receiver_wait_s,
    stall_timeout_s,
    summarize,
)
from agent.options import AgentOptions
from bdn.errors import BdnError, NotFoundError
from bdn.httpclient import error_message
from bdn.retry import is_retryable_status, parse_retry_after
from bdn.store import BlobStore, object_key
from cache.suspicion import SUSPECTED, TRUSTED
from manifests.digest import Digest
from manifests.errors import IntegrityError
from manifests.manifest import ENCODING_RAW, MAX_CHUNK_BYTES, Chunk

log = logging.getLogger(__name__)

OBJECTS_PATH = "/v1/objects/"
HOLDERS_PATH = "/v1/holders/"
HEALTH_PATH = "/healthz"
# A holders answer is a few URLs; more than this is not a holders answer.
MAX_HOLDERS_ANSWER_BYTES = 64 * 1024
# Peer agents asked for one chunk before the cache pods (the pod hands out 2).
MAX_HOLDERS_ASKED = 2
# A peer silent this many first-byte deadlines when one of our requests to it timed
# out is hung: every request in flight to it is cut off (one deadline: only suspected).
VERDICT_SILENCE_DEADLINES = 2
BUFFER_GRAIN_BYTES = 1024 * 1024
# A pool keeps this many idle buffers of one size class; beyond, they are freed.
MAX_IDLE_BUFFERS_PER_SIZE = 32
MISSING_STATUSES = (404, 410)
# A cache pod's answer to an only-if-cached ask it cannot answer from its cache.
UNCACHED_STATUS = 504
ONLY_IF_CACHED = {"Cache-Control": "only-if-cached"}
# Asking a peer agent that is still receiving the chunk: how long it may wait for it
# (seconds; agent/peerserver.py answers 404 once it has waited that long).
WAIT_HEADER = "X-Bdn-Wait-S"
# A body is read this much at a time: how often its bytes count as heard from its peer.
RECEIVE_STEP_BYTES = 256 * 1024
# Weight of the newest transfer in the throughput average the stall period follows.
RATE_EWMA_WEIGHT = 0.2
# Transfers smaller than this say more about latency than throughput: not averaged.
STALL_MIN_SAMPLE_BYTES = 256 * 1024

OwnersFn = Callable[[Digest], Sequence[str]]
# Called on the fetch thread after every answer (the engine counts it, and reports a
# peer's bad bytes before the chunk is asked again); ``retry`` is True past the first.
AnswerFn = Callable[[Chunk, Answer, bool], None]


def verify_chunk_bytes(chunk: Chunk, view: memoryview, where: str) -> None:
    """BLAKE3 on this thread only: fetch threads already run one per connection, and
    spreading each 16 MiB hash over a shared pool only adds hand-offs on a busy node."""
    actual = blake3.blake3(view, max_threads=1).hexdigest()
    if actual != chunk.digest.hex:
        raise IntegrityError(str(chunk.digest), f"b3:{actual}", where=where)


def buffer_size(n: int) -> int:
    """The size class a request for ``n`` bytes is served from (whole grains)."""
    return max(BUFFER_GRAIN_BYTES, -(-n // BUFFER_GRAIN_BYTES) * BUFFER_GRAIN_BYTES)


class BufferPool:
    """Reusable receive buffers: fresh pages cost a fault each, reused ones do not.

    Bounded: the bytes it holds — buffers lent out plus idle ones — stay under
    ``max_bytes`` (the agent passes its bytes-in-flight cap). Chunks of many distinct
    sizes would otherwise leave idle buffers of every size class behind; on a miss, idle
    buffers of other sizes are freed (largest first) to make room, and a returned buffer
    is kept only while it fits. Lent bytes are bounded by the caller (the engine takes a
    buffer only after the bytes-in-flight cap admitted the chunk), so a request is never
    refused; at most it is not kept.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < BUFFER_GRAIN_BYTES:
            raise ValueError(f"BufferPool.max_bytes must be ≥ {BUFFER_GRAIN_BYTES}")
        self.max_bytes = max_bytes
        self.idle_bytes = 0
        self.live_bytes = 0
        self._free: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()

    @property
    def total_bytes(self) -> int:
        return self.idle_bytes + self.live_bytes

    def get(self, n: int) -> bytearray:
        size = buffer_size(n)
        with self._lock:
            self.live_bytes += size
            free = self._free.get(size)
            if free:
                self.idle_bytes -= size
                buf = free.pop()
                if not free:
                    del self._free[size]
                return buf
            self._trim(self.max_bytes - self.live_bytes)
        return bytearray(size)

    def put(self, buf: bytearray) -> None:
        size = len(buf)
        with self._lock:
            self.live_bytes = max(0, self.live_bytes - size)
            free = self._free.setdefault(size, [])
            if (self.total_bytes + size <= self.max_bytes
                    and len(free) < MAX_IDLE_BUFFERS_PER_SIZE):
                free.append(buf)
                self.idle_bytes += size
            elif not free:
                del self._free[size]

    def _trim(self, keep_idle_bytes: int) -> None:
        """Free idle buffers, largest first, until at most ``keep_idle_bytes`` remain."""
        for size in sorted(self._free, reverse=True):
            free = self._free[size]
            while free and self.idle_bytes > max(0, keep_idle_bytes):
                free.pop()
                self.idle_bytes -= size
            if not free:
                del self._free[size]


@dataclass
class FetchResult:
    tier: str                       # "peer", "cluster" or "store"
    peer: str | None
    answers: list[Answer] = field(default_factory=list)

    @property
    def bad_peers(self) -> list[str]:
        return [a.source for a in self.answers if a.outcome in (CORRUPT, TRUNCATED)
                and a.source != STORE]


def _first_ready(waiting: Sequence[tuple[str, http.client.HTTPConnection]],
                 timeout_s: float) -> tuple[str, http.client.HTTPConnection] | None:
    """The first of the sent requests whose socket has something to read (the start of
    an answer, or its end) within ``timeout_s``; None when none has."""
    socks = {c.sock.fileno(): (peer, c) for peer, c in waiting if c.sock is not None}
    if not socks:
        return waiting[0] if waiting else None  # no socket: let the read report it
    readable, _, _ = select.select(list(socks), [], [], timeout_s)
    return socks[readable[0]] if readable else None


def _connection(peer: str, timeout_s: float) -> http.client.HTTPConnection:
    """A new (unopened) connection to ``peer``'s host and port."""
    parts = urlsplit(peer)
    cls = (http.client.HTTPSConnection if parts.scheme == "https"
           else http.client.HTTPConnection)
    return cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)


def _error_text(body: bytes) -> str:
    """``": <the server's sentence>"`` (:func:`bdn.httpclient.error_message`, on one
    line, cut to 200 characters), else ``""``."""
    said = " ".join(error_message(body).split())[:200]  # one line, even from HTML
    return f": {said}" if said else ""


class _Answered(Exception):
    """One try ended without verified bytes; ``outcome`` classifies it for the policy."""

    def __init__(self, outcome: str, detail: str, retry_after_s: float | None = None,
                 *, alive: bool = False) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.retry_after_s = retry_after_s
        self.alive = alive


class Fetcher:
    """Fetches chunks into buffers and verifies them. Safe to call from many threads."""

    def __init__(self, options: AgentOptions, store: BlobStore | None,
                 owners: OwnersFn | None = None, on_answer: AnswerFn | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 suspicion: Suspicion | None = None) -> None:
        self.options = options
        self.store = store
        # The owners come from the one ring (cache/client.py's RingClient.owners); no
        # ring (no cache peers) means no peers to ask.
        self._owners: OwnersFn = owners or (lambda d: [])
        self._on_answer = on_answer
        self._clock = clock
        self.suspicion = suspicion or Suspicion(options.suspect_s)
        # Observed peer throughput (bytes/s, EWMA over finished transfers) for the
        # stall period; None until one finished.
        self.rate_bytes_per_s: float | None = None
        self._rate_lock = threading.Lock()
        self._local = threading.local()
        self._rng = random.Random()
        # Set when the agent stops: a chunk waiting out a backoff gives up at once.
        self._closing = threading.Event()
        # When a byte last came from each peer, on any connection (monotonic seconds):
        # a pod that is slow to answer one request but sends on others is alive.
        self._heard_s: dict[str, float] = {}
        # What response heads take to arrive (the first-byte deadline follows it).
        self._head_latency = HeadLatency()
        # Pods whose holders lookup timed out are not asked for holders while suspected
        # here (the same policy as chunk requests, kept apart so that a lookup never
        # moves a pod's fills): the lookup is optional, and asking a hung pod once per
        # chunk cost every chunk a first-byte deadline before its own request was sent.
        self._lookup_suspicion = Suspicion(options.suspect_s)
        # Requests sent and not yet answered, by peer: when one request finds a peer
        # hung, every other thread's wait on it ends at once (:meth:`_declare_hung`).
        self._inflight: dict[str, set[http.client.HTTPConnection]] = {}
        self._inflight_lock = threading.Lock()
        # Probes of half-open peers running beside the pulls (one thread each).
        self._probing: set[str] = set()

    def close(self) -> None:
        self._closing.set()

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    # -- connections -----------------------------------------------------------------

    def _conn(self, peer: str) -> http.client.HTTPConnection:
        conns: dict[str, http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "conns", {})
        conn = conns.get(peer)
        if conn is None:
            conn = _connection(peer, self.options.connect_timeout_s)
            conns[peer] = conn
        return conn

    def _drop(self, peer: str) -> None:
        conns = self._local.__dict__.get("conns", {})
        conn = conns.pop(peer, None)
        if conn is not None:
            # Under the registry's lock: a verdict never shuts down a socket whose
            # descriptor was closed (and perhaps reused) under it.
            with self._inflight_lock:
                self._inflight.get(peer, set()).discard(conn)
                conn.close()

    def _track(self, peer: str, conn: http.client.HTTPConnection) -> None:
        """``conn`` holds a request to ``peer`` awaiting its answer."""
        with self._inflight_lock:
            self._inflight.setdefault(peer, set()).add(conn)

    def _untrack(self, peer: str, conn: http.client.HTTPConnection) -> None:
        with self._inflight_lock:
            self._inflight.get(peer, set()).discard(conn)

    def _declare_hung(self, peer: str, now_s: float, why: str) -> None:
        """``peer`` timed out and sent nothing on any connection for a deadline: suspect
        it; silent for :data:`VERDICT_SILENCE_DEADLINES` deadlines, it is hung: end
        every other wait on it now — each thread's request to it (heads awaited,
        bodies stalled, holders lookups) is shut down and answers :data:`TIMEOUT`
        (:meth:`_abandoned`), so the agent pays about one verdict for a hung pod, not
        one deadline per request in flight (16 threads started at different times)."""
        self.suspicion.failed(peer, now_s)
        if not self.silent(peer, now_s, VERDICT_SILENCE_DEADLINES):
            # Silent for one deadline but not for two: more likely a pod whose link
            # is full (its streams to us starved a while) than a hung one. Suspected
            # for new chunks, but what is in flight to it is left to finish: cutting
            # it off would move those fills to the next pod (second store reads, 1.6×
            # the model on the fleet bench at 40 Mbit/s with 8 connections per agent).
            log.warning("%s is suspected (%s); requests in flight to it continue", peer,
                        why)
            return
        with self._inflight_lock:
            conns = self._inflight.pop(peer, set())
            for conn in conns:
                conn.bdn_abandoned = True  # type: ignore[attr-defined]
                if conn.sock is not None:
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)
        log.warning("%s is suspected hung (%s); %d other request(s) to it abandoned",
                    peer, why, len(conns))

    @staticmethod
    def _abandoned(conn: http.client.HTTPConnection) -> bool:
        return bool(getattr(conn, "bdn_abandoned", False))

    def _start_probes(self, peers: Sequence[str], now_s: float) -> None:
        """Probe the half-open ones among ``peers`` beside the pulls (see
        :mod:`cache.suspicion`): no chunk waits on a pod that may still be hung."""
        for peer in peers:
            if peer == STORE or peer in self._probing or self.closing:
                continue
            if self.suspicion.take_probe(peer, now_s):
                self._probing.add(peer)
                threading.Thread(target=self._probe, args=(peer,), daemon=True,
                                 name="bdn-probe").start()

    def _probe(self, peer: str) -> None:
        """``GET /healthz`` with the first-byte deadline for connect and answer: any
        answer trusts ``peer`` again (it is not hung), none suspects it for longer."""
        deadline_s = self.first_byte_s()
        conn = _connection(peer, deadline_s)
        try:
            conn.request("GET", urlsplit(peer).path.rstrip("/") + HEALTH_PATH)
            resp = conn.getresponse()
            resp.read(MAX_HOLDERS_ANSWER_BYTES)
        except (OSError, http.client.HTTPException) as e:
            log.info("probe of %s: no answer within %.1f s (%s); still suspected", peer,
                     deadline_s, type(e).__name__)
            self.suspicion.failed(peer, self._clock())
        else:
            log.info("probe of %s: HTTP %d; trusted again", peer, resp.status)
            self.heard(peer)
            self.suspicion.answered(peer)
            self._lookup_suspicion.answered(peer)
        finally:
            conn.close()
            self._probing.discard(peer)

    # -- one chunk -------------------------------------------------------------------

    def sources(self, chunk: Chunk) -> list[str]:
        """Where to ask, best first (see :meth:`plan_sources`)."""
        return self.plan_sources(chunk)[0]

    def plan_sources(self, chunk: Chunk
                     ) -> tuple[list[str], frozenset[str], frozenset[str]]:
        """Where to ask, best first; which of those are peer agents; and which of the
        peer agents are still receiving the chunk (asked to wait for it, bounded).

        With node-to-node sharing on (``options.peer_advertise``), first the agents the
        owning pod points this agent at (holders, or agents still receiving the chunk;
        not suspected ones) — the lookup also tells the pod this agent is now receiving
        it — then the ring's owners (suspected ones moved behind the others), then the
        blob store unless strict.
        """
        now = self._clock()
        ring = list(self._owners(chunk.digest))
        self._start_probes(ring, now)
        owners = self.suspicion.order(ring, now, inline_probe=False)
        holders: list[str] = []
        receiving: set[str] = set()
        if (self.options.peer_advertise and owners
                and self._lookup_suspicion.state(owners[0], now) != SUSPECTED):
            found, receiving = self._holders(owners[0], chunk)
            self._start_probes(found, now)
            holders = [h for h in found
                       if h not in owners and self.suspicion.state(h, now) == TRUSTED]
        out = holders + owners
        if self.store is not None and not self.options.strict:
            out.append(STORE)
        return out, frozenset(holders), frozenset(receiving & set(holders))

    def sources_without_holders(self, chunk: Chunk) -> list[str]:
        out = self.suspicion.order(list(self._owners(chunk.digest)), self._clock(),
                                   inline_probe=False)
        if self.store is not None and not self.options.strict:
            out.append(STORE)
        return out

    def _holders(self, owner: str, chunk: Chunk) -> tuple[list[str], set[str]]:
        """Agents the owning pod points us at for ``chunk``, and which of them are
        still receiving it (best effort: nobody on any failure). The lookup also
        records us as receiving it (``receiving=1``)."""
        me = self.options.peer_advertise or ""
        path = (urlsplit(owner).path.rstrip("/") + HOLDERS_PATH + str(chunk.digest)
                + "?exclude=" + quote(me, safe="") + "&receiving=1")
        started = self._clock()
        conn = self._conn(owner)
        try:
            conn.request("GET", path)
            self._track(owner, conn)
            if conn.sock is not None:
                conn.sock.settimeout(self.first_byte_s())
            resp = conn.getresponse()
            self.heard(owner)
            self._lookup_suspicion.answered(owner)
            self._observe_head(self._clock() - started)
            data = resp.read(MAX_HOLDERS_ANSWER_BYTES)
            if resp.status != 200:
                if resp.will_close:
                    self._drop(owner)
                return [], set()
            answer = json.loads(data)
            found = answer.get("holders", [])
            still = answer.get("receiving", [])
        except (TimeoutError, OSError, http.client.HTTPException, ValueError,
                AttributeError) as e:
            abandoned = self._abandoned(conn)
            self._drop(owner)
            if not isinstance(e, TimeoutError) and not abandoned:
                return [], set()
            # Not asked for holders again while quiet. And when the pod sent nothing on
            # any connection for a deadline, this is the verdict a chunk request would
            # reach a deadline later: it is suspected for chunks too (its fills move
            # to the next pod; a pod that is merely slow keeps sending and is not).
            now = self._clock()
            self._lookup_suspicion.failed(owner, now)
            if not abandoned and self.silent(owner, now):
                self._declare_hung(owner, now, "a holders lookup timed out")
            log.info("chunk %s: no holders answer from %s within %.1f s", chunk.digest,
                     owner, self.first_byte_s())
            return [], set()
        finally:
            self._untrack(owner, conn)
        if not isinstance(found, list):
            return [], set()
        holders = [h.rstrip("/") for h in found[:MAX_HOLDERS_ASKED]
                   if isinstance(h, str) and h.startswith(("http://", "https://"))
                   and h.rstrip("/") != me]
        receiving = ({h.rstrip("/") for h in still if isinstance(h, str)}
                     if isinstance(still, list) else set())
        return holders, receiving & set(holders)

    def receiver_wait_s(self, chunk: Chunk) -> float:
        """How long a peer still receiving ``chunk`` may wait for it (fetch policy)."""
        return receiver_wait_s(chunk.length, self.rate_bytes_per_s,
                               floor_s=max(RECEIVER_WAIT_FLOOR_S, self.first_byte_s()),
                               ceiling_s=self.options.read_timeout_s)

    def stall_s(self) -> float:
        return stall_timeout_s(self.rate_bytes_per_s, floor_s=self.options.stall_timeout_s,
                               ceiling_s=self.options.read_timeout_s)

    def _observe(self, n: int, seconds: float) -> None:
        if n < STALL_MIN_SAMPLE_BYTES or seconds <= 0:
            return
        rate = n / seconds
        with self._rate_lock:
            old = self.rate_bytes_per_s
            self.rate_bytes_per_s = rate if old is None else (
                old + RATE_EWMA_WEIGHT * (rate - old))

    def first_byte_s(self) -> float:
        """The first-byte deadline now: what heads have taken (``srtt + 4 × rttvar``),
        at least the configured ``first_byte_timeout_s``, at most the read timeout."""
        return self._head_latency.deadline_s(floor_s=self.options.first_byte_timeout_s,
                                             ceiling_s=self.options.read_timeout_s)

    def _observe_head(self, latency_s: float) -> None:
        with self._rate_lock:
            self._head_latency = self._head_latency.observe(latency_s)

    def heard(self, peer: str) -> None:
        """A byte (a response head, body bytes) came from ``peer`` just now."""
        self._heard_s[peer] = self._clock()

    def alive(self, peer: str, since_s: float) -> bool:
        """Whether a byte came from ``peer`` at or after ``since_s``."""
        return self._heard_s.get(peer, float("-inf")) >= since_s

    def silent(self, peer: str, now_s: float, deadlines: int = 1) -> bool:
        """Whether ``peer`` sent nothing on any connection for ``deadlines`` first-byte
        deadlines before ``now_s``: one suspects it, :data:`VERDICT_SILENCE_DEADLINES`
        make it hung."""
        return not self.alive(peer, now_s - deadlines * self.first_byte_s())

    def _suspect(self, answer: Answer) -> bool:
        """Whether ``answer`` makes its peer suspected: a transport error, or a timeout
        of a peer that sent nothing on any connection in the last deadline."""
        if answer.outcome == TIMEOUT:
            return not answer.alive and self.silent(answer.source, answer.ended_s)
        return answer.outcome in SUSPICIOUS

    def fetch_into(self, chunk: Chunk, buf: memoryview) -> FetchResult:
        """Fill ``buf[:chunk.length]`` with the chunk's verified bytes (blocking)."""
        view = buf[:chunk.length]
        sources, peers, receivers = self.plan_sources(chunk)
        budget = self.options.chunk_budget
        history: list[Answer] = []
        reorder = False
        while True:
            now = self._clock()
            if reorder:
                # A suspected source goes behind the others (holders are not looked up
                # again: the ones found are still in ``peers``).
                sources = [s for s in sources if s in peers] + [
                    s for s in self.sources_without_holders(chunk) if s not in peers]
                reorder = False
            fillers = [s for s in sources if s not in peers and s != STORE]
            step = next_source(history, sources, budget, now_s=now,
                               draw=self._rng.random(), fillers=fillers)
            if step.source is None:
                raise self._give_up(chunk, sources, history, step.reason)
            if self.closing or (step.at_s > now and self._closing.wait(step.at_s - now)):
                raise self._give_up(chunk, sources, history, "the agent is stopping")
            # A peer that misses its first-byte deadline is hedged with the next
            # untried peer (only-if-cached unless its turn to fill has come).
            backup = None if step.source == STORE else next(
                (s for s in sources if s not in (step.source, STORE)
                 and all(a.source != s for a in history)), None)
            may_fill = filler(history, fillers, budget)
            backup_cached_only = backup in fillers and backup != may_fill
            for answer in self._ask(step.source, chunk, view, step.cached_only,
                                    backup, backup_cached_only, receivers):
                history.append(answer)
                if answer.source != STORE:
                    if self._suspect(answer):
                        if answer.outcome == TIMEOUT:
                            self._declare_hung(answer.source, answer.ended_s,
                                               f"chunk {chunk.digest}: {answer.detail}")
                        else:
                            self.suspicion.failed(answer.source, answer.ended_s)
                        reorder = True
                    elif answer.outcome != TIMEOUT:
                        self.suspicion.answered(answer.source)
                if answer.outcome not in (OK, UNCACHED):
                    log.warning("chunk %s: %s answered %s: %s", chunk.digest,
                                answer.source, answer.outcome, answer.detail)
                if self._on_answer is not None:
                    self._on_answer(chunk, answer, len(history) > 1)
                if answer.outcome == OK:
                    if answer.source == STORE:
                        return FetchResult(tier="store", peer=None, answers=history)
                    tier = "peer" if answer.source in peers else "cluster"
                    return FetchResult(tier=tier, peer=answer.source, answers=history)

    def _give_up(self, chunk: Chunk, sources: Sequence[str], history: Sequence[Answer],
                 reason: str) -> FetchError:
        unasked = [s for s in sources if all(a.source != s for a in history)]
        what = (f"chunk {chunk.digest} ({chunk.length} bytes): {reason}. "
                f"Answers: {summarize(history)}"
                + (f"; not asked: {', '.join(unasked)}" if unasked else ""))
        attempts = tuple(f"{a.source}: {a.outcome}: {a.detail}" for a in history)
        if self.options.strict:
            return StrictOriginError(
                f"strict mode, the blob store may not be used: no cache peer delivered "
                f"{what}", digest=str(chunk.digest), attempts=attempts)
        return FetchError(f"no tier delivered {what}", digest=str(chunk.digest),
                          attempts=attempts)

    def _ask(self, source: str, chunk: Chunk, view: memoryview, cached_only: bool = False,
             backup: str | None = None, backup_cached_only: bool = False,
             receivers: frozenset[str] = frozenset()) -> list[Answer]:
        """Ask ``source`` for the chunk; the answers that came of it, oldest first.

        A peer that sends no first byte within the deadline is hedged: the same chunk
        is asked of ``backup`` (the next untried peer). Bytes from the backup win: the
        source's request is cancelled (its connection closed) and it is answered
        :data:`TIMEOUT`. Any other answer of the backup (a 504 to only-if-cached, an
        error) leaves the source the one asked: it is waited for one more deadline,
        and beyond while it shows it is alive (see the module docstring).

        A peer agent in ``receivers`` is still receiving the chunk: it is asked to wait
        for it (:meth:`receiver_wait_s`, sent as :data:`WAIT_HEADER`), and its
        first-byte deadline is that much longer.
        """
        if source == STORE:
            where = f"chunk from blob store {self.store.url if self.store else ''}"
            return [self._classify(STORE, self._clock(), chunk, view,
                                   lambda: self._from_store(chunk, view), where)]
        started = self._clock()
        wait_s = self.receiver_wait_s(chunk)
        sent = self._send(source, chunk, cached_only,
                          wait_s if source in receivers else None)
        if isinstance(sent, Answer):
            return [sent]
        deadline_s = self.first_byte_s() + (wait_s if source in receivers else 0.0)
        if _first_ready([(source, sent)], deadline_s) is not None:
            return [self._receive_answer(source, sent, started, chunk, view, cached_only,
                                         waited=source in receivers)]
        out: list[Answer] = []
        if backup is not None:
            log.info("chunk %s: %s sent no first byte within %g s; hedging with %s%s",
                     chunk.digest, source, deadline_s, backup,
                     " (only-if-cached)" if backup_cached_only else "")
            b_started = self._clock()
            b_sent = self._send(backup, chunk, backup_cached_only,
                                wait_s if backup in receivers else None)
            if isinstance(b_sent, Answer):
                out.append(b_sent)
            else:
                won = _first_ready([(source, sent), (backup, b_sent)], deadline_s)
                if won is not None and won[0] == source and self._abandoned(sent):
                    # The source was found hung meanwhile: the backup's answer is the
                    # one to wait for.
                    won = _first_ready([(backup, b_sent)], deadline_s)
                elif won is not None and won[0] == source:
                    self._drop(backup)  # cancel the slower request
                    return [self._receive_answer(source, sent, started, chunk, view,
                                                 cached_only, waited=source in receivers)]
                if won is None:
                    self._drop(backup)
                    out.append(Answer(backup, TIMEOUT, b_started, self._clock(),
                                      f"no answer within the first-byte deadline of "
                                      f"{deadline_s:g} s"))
                else:
                    answer = self._receive_answer(backup, b_sent, b_started, chunk, view,
                                                  backup_cached_only,
                                                  waited=backup in receivers)
                    if answer.outcome == OK:
                        self._drop(source)  # cancel the slower request
                        lost = Answer(source, TIMEOUT, started, self._clock(),
                                      f"no first byte within {deadline_s:g} s; {backup} "
                                      "answered first")
                        return [lost, answer]
                    out.append(answer)
        # Still the source's to answer: one more deadline, then as long as it is alive.
        grace_end = started + 2 * deadline_s
        cap = started + self.options.read_timeout_s
        while True:
            now = self._clock()
            if now >= cap or (now >= grace_end and not self.alive(source, now - deadline_s)):
                break
            wait = min(cap, grace_end if now < grace_end else now + deadline_s) - now
            if _first_ready([(source, sent)], wait) is not None:
                return [*out, self._receive_answer(source, sent, started, chunk, view,
                                                   cached_only, waited=source in receivers)]
        self._drop(source)
        return [*out, Answer(source, TIMEOUT, started, self._clock(),
                             f"no first byte within {self._clock() - started:.1f} s "
                             f"(first-byte deadline {deadline_s:g} s)")]

    def _send(self, peer: str, chunk: Chunk, cached_only: bool = False,
              wait_s: float | None = None) -> http.client.HTTPConnection | Answer:
        """Send the chunk's request to ``peer`` (``only-if-cached`` if ``cached_only``;
        a peer agent still receiving it may wait ``wait_s`` for it); the connection, or
        what went wrong."""
        started = self._clock()
        conn = self._conn(peer)
        if conn.sock is not None and _first_ready([(peer, conn)], 0) is not None:
            # An idle kept-alive connection with something to read was closed by the
            # server (its idle timeout): not the peer's fault, reconnect.
            self._drop(peer)
            conn = self._conn(peer)
        path = urlsplit(peer).path.rstrip("/") + OBJECTS_PATH + str(chunk.digest)
        try:
            conn.request("GET", path, headers={"Range": f"bytes=0-{chunk.length - 1}",
                                               "Accept-Encoding": "identity",
                                               **(ONLY_IF_CACHED if cached_only else {}),
                                               **({WAIT_HEADER: f"{wait_s:.3f}"}
                                                  if wait_s is not None else {})})
        except TimeoutError:
            self._drop(peer)
            return Answer(peer, TIMEOUT, started, self._clock(), f"no connection within "
                          f"{self.options.connect_timeout_s:g} s")
        except (OSError, http.client.HTTPException) as e:
            self._drop(peer)
            return Answer(peer, ERROR, started, self._clock(), f"{type(e).__name__}: {e}")
        self._track(peer, conn)
        return conn

    def _receive_answer(self, peer: str, conn: http.client.HTTPConnection, started: float,
                        chunk: Chunk, view: memoryview, cached_only: bool = False, *,
                        waited: bool = False) -> Answer:
        """Read and classify the answer to a sent request; ``waited``: the peer was
        asked to wait for a chunk it is still receiving (its head says nothing about
        how fast heads come)."""
        answer = self._classify(peer, started, chunk, view,
                                lambda: self._receive(peer, conn, chunk, view, cached_only,
                                                      started, waited),
                                f"chunk from peer {peer}")
        self._untrack(peer, conn)
        if self._abandoned(conn):
            self._drop(peer)  # shut down under it: never reused
            if answer.outcome != OK:
                # Not bad bytes from the peer: this end cut it off (another request
                # found the peer hung); nothing is reported to the cache.
                return Answer(peer, TIMEOUT, started, self._clock(),
                              f"abandoned: {peer} is suspected hung (another request to "
                              "it timed out)")
        return answer

    def _classify(self, source: str, started: float, chunk: Chunk, view: memoryview,
                  work: Callable[[], None], where: str) -> Answer:
        """Run ``work`` (fill ``view``), verify the bytes, and classify what happened."""
        try:
            work()
            verify_chunk_bytes(chunk, view, where)
        except IntegrityError as e:
            return Answer(source, CORRUPT, started, self._clock(), str(e))
        except zstandard.ZstdError as e:
            return Answer(source, CORRUPT, started, self._clock(),
                          f"zstd object does not decode: {e}")
        except _Answered as e:
            return Answer(source, e.outcome, started, self._clock(), str(e),
                          retry_after_s=e.retry_after_s, alive=e.alive)
        except NotFoundError as e:
            return Answer(source, MISSING, started, self._clock(), str(e))
        except TimeoutError as e:
            if source != STORE:
                self._drop(source)
            return Answer(source, TIMEOUT, started, self._clock(), str(e) or "timed out")
        except (OSError, http.client.HTTPException, BdnError, ValueError) as e:
            if source != STORE:
                self._drop(source)
            return Answer(source, ERROR, started, self._clock(),
                          f"{type(e).__name__}: {e}")
        ended = self._clock()
        if source != STORE:
            self._observe(chunk.length, ended - started)
        return Answer(source, OK, started, ended)

    def _receive(self, peer: str, conn: http.client.HTTPConnection, chunk: Chunk,
                 view: memoryview, cached_only: bool, started: float,
                 waited: bool = False) -> None:
        """Read the answer to a request :meth:`_send` sent at ``started`` (its first byte
        is there)."""
        head_s = self.first_byte_s()
        if conn.sock is not None:
            conn.sock.settimeout(head_s)
        try:
            resp = conn.getresponse()
        except TimeoutError:
            raise TimeoutError(f"the response head did not arrive within "
                               f"{head_s:.1f} s") from None
        self.heard(peer)
        if not waited:
            # A receiver's head comes when its own receive is done: not a head latency
            # (observed, it raised the deadline to 10 s on the fleet bench, and a hung
            # pod then cost that much).
            self._observe_head(self._clock() - started)
        stall_s = self.stall_s()
        if conn.sock is not None:
            conn.sock.settimeout(stall_s)
        if resp.status not in (200, 206):
            said = _error_text(resp.read(64 * 1024))
            if resp.will_close:
                self._drop(peer)
            retry_after = parse_retry_after(resp.getheader("Retry-After"))
            if resp.status in MISSING_STATUSES:
                raise _Answered(MISSING, f"HTTP {resp.status}{said}")
            if cached_only and resp.status == UNCACHED_STATUS:
                raise _Answered(UNCACHED, "not cached there (asked only-if-cached)")
            if is_retryable_status(resp.status) and retry_after is not None:
                raise _Answered(BUSY, f"HTTP {resp.status}, Retry-After {retry_after:g} s",
                                retry_after_s=retry_after)
            raise _Answered(ERROR, f"HTTP {resp.status}{said}")
        encoding = (resp.getheader("Content-Encoding") or "").lower()
        if encoding in ("zstd", "zst"):
            # Bounded: a peer cannot make us buffer more than the largest chunk.
            data_in = resp.read(MAX_CHUNK_BYTES + 1)
            if len(data_in) > MAX_CHUNK_BYTES:
                self._drop(peer)
                raise _Answered(CORRUPT, f"zstd body above {MAX_CHUNK_BYTES} bytes")
            try:
                data = zstandard.ZstdDecompressor().decompress(
                    data_in, max_output_size=chunk.length)
            except zstandard.ZstdError as e:
                raise _Answered(CORRUPT, f"zstd body does not decode: {e}") from None
            if len(data) != chunk.length:
                raise _Answered(TRUNCATED if len(data) < chunk.length else CORRUPT,
                                f"decoded {len(data)} bytes, want {chunk.length}")
            view[:] = data
            return
        length = resp.getheader("Content-Length")
        if length is not None and int(length) != chunk.length:
            resp.close()
            self._drop(peer)
            raise _Answered(TRUNCATED if int(length) < chunk.length else CORRUPT,
                            f"sent {length} bytes for a chunk of {chunk.length}")
        got = 0
        try:
            while got < chunk.length:
                # Bounded steps: HTTPResponse.readinto fills all it is given before it
                # returns, so one call for the body would show no byte of it until the
                # last — a pod streaming a large chunk slowly would look silent, and a
                # silence verdict would cut off the very transfer that shows it alive.
                n = resp.readinto(view[got:got + RECEIVE_STEP_BYTES])
                if not n:
                    break
                got += n
                self.heard(peer)
        except TimeoutError:
            self._drop(peer)
            if not got:
                # It answered, then sent no body: a pod waiting on its store for the
                # fill it streams. Re-asked, but not suspected (that would only move
                # the fill to the next pod: a second store read).
                raise _Answered(TIMEOUT, f"stalled: the head came, then no body byte for "
                                f"{stall_s:.1f} s", alive=True) from None
            raise TimeoutError(f"stalled: no byte for {stall_s:.1f} s after {got} of "
                               f"{chunk.length} bytes") from None
        except (OSError, http.client.HTTPException) as e:
            self._drop(peer)
            if not got:
                raise
            raise _Answered(TRUNCATED, f"the body broke off after {got} of {chunk.length} "
                                       f"bytes: {type(e).__name__}: {e}") from None
        if got < chunk.length:
            self._drop(peer)
            raise _Answered(TRUNCATED, f"the body ended after {got} of {chunk.length} bytes")
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
            raise _Answered(TRUNCATED, f"store object {chunk.digest} holds {got} bytes, "
                                       f"want {chunk.length}")
