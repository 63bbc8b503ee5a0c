"""Which source to ask next for one chunk, and when: a pure policy over the answers so far.

A chunk is asked of its sources in order — the cache peers in ring order for its digest
(the owner first), then the blob store unless the agent is strict — and each answer is
recorded as an :class:`Answer`. :func:`next_source` looks only at those answers, the
budget and an explicit ``now``, so every retry decision is tested without clocks or
sockets (``agent/fetch.py`` does the I/O and the sleeping). The rules:

* A source that has answered less is asked first, so a corrupt peer is replaced by the
  next peer before the blob store, and the store is asked before a peer is asked twice.
* A corrupt, truncated or failed answer counts against ``tries_per_source``: past it the
  source is passed over for this chunk (bounded, but not "skip this peer forever" — one
  bad copy reported to the cache is usually gone by the next try). A missing object
  (404) is final for that source: cache peers read the same store.
* A timeout of a source that showed it is alive (``Answer.alive``: slow, not hung)
  uses up a try only every :data:`ALIVE_TIMEOUTS_PER_TRY` times: the owner keeps its
  fill a while longer rather than hand it to the next pod (a second store read).
* A busy answer (429/503 with ``Retry-After``) does not use up tries: the source is asked
  again once the server's ``Retry-After`` has passed (capped by the backoff policy), and
  only the total waiting bounds it — ``wait_max_s`` over the whole chunk — so a store blip
  of a few seconds behind the cache does not fail a pull, and a dead store still does.
* Only one cache pod at a time may *fill* a chunk from the store — the first of the
  ``fillers`` (the pods in placement order, suspected ones last) not yet passed over
  for this chunk (:func:`filler`). Every other pod is asked ``only-if-cached``
  (:attr:`Step.cached_only`); its 504 is :data:`UNCACHED`, which costs no try: that
  pod is asked again only once it is the filler (its owner before it is suspected,
  missing or out of tries, or it served bad bytes for the chunk). So however many
  agents hedge or re-ask, each chunk is read from the store once when nothing fails
  (issue 17: origin ÷ model = 1.00).
* Other answers are spaced by the backoff policy's capped, jittered delay
  (``bdn.retry.RetryPolicy``); the random ``draw`` is an input. A timeout is the
  exception: the peer that hung is not asked again before every other source had its
  turn, and the next source is asked at once (the *hedge*: a hung owner costs one
  first-byte deadline, not a backoff on top).

Across chunks, :class:`cache.suspicion.Suspicion` (one per agent, shared with the ring
client, so a pod that hung on a manifest is passed over for chunks too) moves a peer
that timed out or failed behind the trusted sources for a while, then lets one chunk
probe it. :func:`stall_timeout_s` derives how long a transfer may go without a byte
from the throughput seen so far, within a floor and a ceiling. Like
:func:`next_source`, both take ``now`` as an input: tested with a fake clock.
:func:`receiver_wait_s` bounds how long a peer agent that is still receiving a chunk is
waited for (it answers once it verified the chunk, or 404 at once if its receive
failed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

from bdn.retry import RetryPolicy
from cache.suspicion import DEFAULT_SUSPECT_S, MAX_SUSPECT_S, Suspicion

STORE = "store"  # the blob store, as a source name beside the peers' URLs

OK = "ok"
CORRUPT = "corrupt"      # bytes arrived whole but did not hash to the digest
TRUNCATED = "truncated"  # the body ended (or the connection dropped) before its end
BUSY = "busy"            # 429/503 with Retry-After: ask again later, not a fault
ERROR = "error"          # transport failure or another HTTP status
MISSING = "missing"      # 404/410: the source does not have the object
# 504 to an only-if-cached ask: that pod does not hold it and was not asked to fill it.
UNCACHED = "uncached"
# No connection within the connect timeout, no first byte by the first-byte deadline,
# or no byte for the stall period: the source may be hung (SIGSTOP, a vanished node).
TIMEOUT = "timeout"
OUTCOMES = (OK, CORRUPT, TRUNCATED, BUSY, ERROR, MISSING, TIMEOUT, UNCACHED)
# Answers that use up one of a source's tries.
FAULTS = (CORRUPT, TRUNCATED, ERROR, TIMEOUT)
# Answers that make a peer suspected across chunks; any other answer trusts it again.
SUSPICIOUS = (TIMEOUT, ERROR)
# Answers that say the source served bad bytes: reported to the cache that sent them.
BAD_BYTES = (CORRUPT, TRUNCATED)
# A busy server that sends ``Retry-After: 0`` (or none we can read) is still not asked
# again sooner than this, so busy answers cannot spin.
MIN_BUSY_DELAY_S = 0.05
DEFAULT_TRIES_PER_SOURCE = 3
# Slow-but-alive timeouts (head sent, no body byte for the stall period) per try used.
ALIVE_TIMEOUTS_PER_TRY = 4
DEFAULT_WAIT_MAX_S = 30.0
DEFAULT_BACKOFF = RetryPolicy(attempts=DEFAULT_TRIES_PER_SOURCE, base_delay_s=0.1,
                              max_delay_s=2.0)
# A transfer is stalled when no byte came for the time the observed throughput needs
# for this many bytes, times STALL_SLOWDOWN — never less than the floor (a loaded
# node's scheduling hiccups) nor more than the ceiling (the read timeout).
STALL_BLOCK_BYTES = 1024 * 1024
STALL_SLOWDOWN = 8.0
# A peer still receiving a chunk is given the time that chunk takes at the throughput
# seen so far, this many times over, to finish and verify it before its answer is due.
RECEIVER_SLOWDOWN = 4.0
# ... and never less than this: a receiver's own chunk may wait on the pods (all N
# agents start at once) or on another receiver, longer than its transfer takes. At the
# first-byte deadline's 1.5 s, receivers gave up on most waits (their 404s sent ~450
# asks per N = 16 pull back to the pods on bench/fleet.py). A receiver that dies
# answers at once (refused, reset); one that hangs costs this once, then is suspected.
RECEIVER_WAIT_FLOOR_S = 4.0
# RFC 6298's gains and deviation factor, for the head latency (HeadLatency).
HEAD_ALPHA = 0.125
HEAD_BETA = 0.25
HEAD_K = 4.0


@dataclass(frozen=True)
class Answer:
    """What one source answered for one chunk, and when (monotonic seconds)."""

    source: str
    outcome: str
    started_s: float
    ended_s: float
    detail: str = ""
    retry_after_s: float | None = None
    # A timeout of a source that showed it is alive meanwhile (it sent the response
    # head, then no body byte: a pod waiting on its own fill): slow, not hung.
    alive: bool = False

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"Answer.outcome must be one of {OUTCOMES}, got "
                             f"{self.outcome!r}")


@dataclass(frozen=True)
class ChunkRetryBudget:
    """How hard to try for one chunk: tries per source, total waiting, backoff shape."""

    tries_per_source: int = DEFAULT_TRIES_PER_SOURCE
    wait_max_s: float = DEFAULT_WAIT_MAX_S
    backoff: RetryPolicy = field(default_factory=lambda: DEFAULT_BACKOFF)

    def __post_init__(self) -> None:
        if self.tries_per_source < 1:
            raise ValueError("ChunkRetryBudget.tries_per_source must be ≥ 1")
        if self.wait_max_s < 0:
            raise ValueError("ChunkRetryBudget.wait_max_s must be ≥ 0")


@dataclass(frozen=True)
class Step:
    """Ask ``source`` at ``at_s`` (≥ now); ``source`` None: give up, ``reason`` says why.
    ``cached_only``: ask it ``only-if-cached`` (a pod whose turn to fill it is not)."""

    source: str | None
    at_s: float
    reason: str = ""
    cached_only: bool = False


def waited_s(history: Sequence[Answer]) -> float:
    """Seconds spent between answers (backoff, Retry-After, reporting), not in transfers."""
    return sum(max(0.0, b.started_s - a.ended_s) for a, b in pairwise(history))


def _slow_alive(answer: Answer) -> bool:
    """A timeout of a source that showed it is alive (a pod that sent the head and
    waits on its store for the fill it streams): slow, not hung."""
    return answer.outcome == TIMEOUT and answer.alive


def _tries_used(mine: Sequence[Answer]) -> int:
    """Tries a source used up: one per fault, but slow-but-alive timeouts only one per
    :data:`ALIVE_TIMEOUTS_PER_TRY` — passing the owner over moves its fill to the next
    pod, a second store read (origin ÷ model 1.27–1.41 on the fleet bench at 40 Mbit/s,
    where a fill's first body byte can take longer than the stall floor). Counted in
    tries, not in the wait budget: time spent in such answers failed pulls there."""
    alive = sum(1 for a in mine if _slow_alive(a))
    faults = sum(1 for a in mine if a.outcome in FAULTS and not _slow_alive(a))
    return faults + alive // ALIVE_TIMEOUTS_PER_TRY


def _ready_at(mine: Sequence[Answer], budget: ChunkRetryBudget, draw: float) -> float:
    last = mine[-1]
    if last.outcome == BUSY:
        busy = sum(1 for a in mine if a.outcome == BUSY)
        delay = max(MIN_BUSY_DELAY_S, budget.backoff.delay_s(
            busy, retry_after_s=last.retry_after_s, draw=draw))
    else:
        delay = budget.backoff.delay_s(len(mine), draw=draw)
    return last.ended_s + delay


def _passed_over(mine: Sequence[Answer], budget: ChunkRetryBudget) -> bool:
    """Whether a source is done with for this chunk: missing there, or out of tries."""
    return (any(a.outcome == MISSING for a in mine)
            or _tries_used(mine) >= budget.tries_per_source)


def filler(history: Sequence[Answer], fillers: Sequence[str],
           budget: ChunkRetryBudget) -> str | None:
    """The one pod that may fill the chunk from the store now: the first of
    ``fillers`` (pods in placement order, suspected ones last) not passed over, among
    those that served the fewest bad bytes for it — a pod whose copy was corrupt or
    cut off hands the turn on (a fault costs a fill; a fault-free pull never does)."""
    best: tuple[int, int, str] | None = None
    for rank, pod in enumerate(fillers):
        mine = [a for a in history if a.source == pod]
        if _passed_over(mine, budget):
            continue
        key = (sum(1 for a in mine if a.outcome in BAD_BYTES), rank, pod)
        if best is None or key < best:
            best = key
    return best[2] if best is not None else None


def next_source(history: Sequence[Answer], sources: Sequence[str],
                budget: ChunkRetryBudget, *, now_s: float, draw: float,
                fillers: Sequence[str] = ()) -> Step:
    """The next source to ask for a chunk and when, or give up (``source`` None).

    ``history``: every answer so far for this chunk, oldest first; ``sources``: in
    preference order (peers in ring order, then :data:`STORE` when it may be used);
    ``draw``: a random number in [0, 1] for the backoff's jitter; ``fillers``: the
    cache pods among ``sources``, in the order they may fill it (see :func:`filler`) —
    the others of them are asked ``only-if-cached``.
    """
    may_fill = filler(history, fillers, budget)
    candidates: list[tuple[int, float, int, str]] = []
    for rank, source in enumerate(sources):
        mine = [a for a in history if a.source == source]
        if _passed_over(mine, budget):
            continue
        if mine and mine[-1].outcome == UNCACHED and source != may_fill:
            continue  # it said it does not hold it; ask again only to fill
        counted = [a for a in mine if a.outcome != UNCACHED]
        if not counted or mine[-1].outcome == UNCACHED:
            at = now_s
        elif counted[-1].outcome == TIMEOUT:
            at = now_s  # hedge: re-ask at once (it is sorted behind untried sources)
        else:
            at = max(now_s, _ready_at(counted, budget, draw))
        candidates.append((len(counted), at, rank, source))
    if not candidates:
        return Step(None, now_s, f"no source left to ask (up to "
                                 f"{budget.tries_per_source} tries per source; a missing "
                                 f"object is final)")
    spent = waited_s(history)
    last_end = history[-1].ended_s if history else now_s
    for _, at, _, source in sorted(candidates):
        if spent + max(0.0, at - last_end) <= budget.wait_max_s:
            return Step(source, at, cached_only=source in fillers and source != may_fill)
    return Step(None, now_s, f"the next try would pass the wait budget of "
                             f"{budget.wait_max_s:g} s (waited {spent:.1f} s)")


def stall_timeout_s(rate_bytes_per_s: float | None, *, floor_s: float,
                    ceiling_s: float) -> float:
    """How long a transfer may go without a byte before it counts as stalled.

    ``rate_bytes_per_s``: the throughput observed on earlier transfers (None before the
    first): the time it needs for :data:`STALL_BLOCK_BYTES`, times
    :data:`STALL_SLOWDOWN`, clamped to ``[floor_s, ceiling_s]``; the floor before any
    transfer finished (a stall is *no* byte at all, which a live link does not show).
    """
    if rate_bytes_per_s is None or rate_bytes_per_s <= 0:
        return min(floor_s, ceiling_s)
    wanted = STALL_SLOWDOWN * STALL_BLOCK_BYTES / rate_bytes_per_s
    return max(floor_s, min(ceiling_s, wanted))


def receiver_wait_s(length_bytes: int, rate_bytes_per_s: float | None, *, floor_s: float,
                    ceiling_s: float) -> float:
    """How long a peer that is still *receiving* a chunk may wait for it (and the
    requester for its answer, on top of the first-byte deadline) before it is passed
    over: the time ``length_bytes`` take at the observed throughput, times
    :data:`RECEIVER_SLOWDOWN`, clamped to ``[floor_s, ceiling_s]``; the floor before
    any transfer finished. Bounded, so a receiver that hangs costs one such wait and
    the chunk is asked of the pods (the hedge), as for a hung pod."""
    if rate_bytes_per_s is None or rate_bytes_per_s <= 0:
        return min(floor_s, ceiling_s)
    wanted = RECEIVER_SLOWDOWN * length_bytes / rate_bytes_per_s
    return max(floor_s, min(ceiling_s, wanted))


@dataclass(frozen=True)
class HeadLatency:
    """How long response heads take to arrive, as TCP estimates its round trip (RFC
    6298): a smoothed mean and mean deviation over the heads seen so far.

    Why: a fixed first-byte deadline fires on pods that are only queued — when N nodes
    pull at once the pods' links are full and a head waits behind bodies (seconds on
    the fleet bench) — and every false timeout moves a fill to the next pod. The
    deadline follows what heads really take (:meth:`deadline_s`), never below the
    configured floor, so an idle cluster still finds a hung pod within the floor.
    """

    srtt_s: float | None = None
    rttvar_s: float = 0.0

    def observe(self, latency_s: float) -> HeadLatency:
        if self.srtt_s is None:
            return HeadLatency(latency_s, latency_s / 2)
        rttvar = (1 - HEAD_BETA) * self.rttvar_s + HEAD_BETA * abs(self.srtt_s - latency_s)
        return HeadLatency((1 - HEAD_ALPHA) * self.srtt_s + HEAD_ALPHA * latency_s, rttvar)

    def deadline_s(self, *, floor_s: float, ceiling_s: float) -> float:
        """``srtt + 4 × rttvar`` within ``[floor_s, ceiling_s]``; the floor before any
        head arrived."""
        if self.srtt_s is None:
            return min(floor_s, ceiling_s)
        return max(floor_s, min(ceiling_s, self.srtt_s + HEAD_K * self.rttvar_s))


def summarize(history: Sequence[Answer]) -> str:
    """What each source answered, e.g. ``http://p:8401 answered 3× corrupt (last: …)``."""
    by_source: dict[str, list[Answer]] = {}
    for a in history:
        by_source.setdefault(a.source, []).append(a)
    parts = []
    for source, answers in by_source.items():
        counts: dict[str, int] = {}
        for a in answers:
            counts[a.outcome] = counts.get(a.outcome, 0) + 1
        said = ", ".join(f"{n}× {outcome}" for outcome, n in counts.items())
        name = "the blob store" if source == STORE else source
        last = answers[-1].detail
        parts.append(f"{name} answered {said}" + (f" (last: {last})" if last else ""))
    return "; ".join(parts) or "no source was asked"


__all__ = ["ALIVE_TIMEOUTS_PER_TRY", "BAD_BYTES", "BUSY", "CORRUPT", "DEFAULT_SUSPECT_S",
           "ERROR", "FAULTS", "MAX_SUSPECT_S", "MISSING", "OK", "OUTCOMES",
           "RECEIVER_WAIT_FLOOR_S", "STORE", "SUSPICIOUS", "TIMEOUT", "TRUNCATED",
           "UNCACHED", "Answer", "ChunkRetryBudget", "HeadLatency", "Step", "Suspicion",
           "filler", "next_source", "receiver_wait_s", "stall_timeout_s", "summarize",
           "waited_s"]
