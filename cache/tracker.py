"""Which agents hold — or are receiving — which chunks: the owning cache pod's
short-lived record, and whom it points a requester at. Pure.

Agents that verified a chunk into their node cache announce it to the chunk's owning
pod (``POST /v1/holders``); an agent about to fetch a chunk asks the owner whom to ask
(``GET /v1/holders/{digest}?exclude=ME&receiving=1``) and tries those before the pod
itself. So when 32 nodes pull one model at once, the pod's link carries each chunk
about once and the nodes' links carry the rest (Dragonfly's and Kraken's trick), while
the requester still verifies every byte.

*Receivers.* When N agents start at the same instant nobody *holds* a chunk yet, so a
record of holders alone sends all N to the pods. The lookup itself therefore records
the asker as *receiving* the chunk (the lookup and the record are one step on the pod,
so N simultaneous askers are ordered: no window in which two both see "nobody"). Later
askers may be pointed at a receiver; its peer listener waits (bounded) until the chunk
is verified and then serves it, or answers 404 at once if the receive failed. A
receiving record lives ``receiving_ttl_s`` (a few seconds: a receiver that died stops
being handed out quickly), renewed while the receive makes progress and turned into a
holding record (``ttl_s``) by the completion announcement.

*Whom to point at* is the pure :func:`point` over the records, the pod's recent reads of
the chunk and ``now``:

* live complete holders first, the least loaded first, rotating among equals
  (concurrent askers spread over all of them);
* then receivers, oldest first (furthest along; those already carrying ``fanout``
  askers of any chunk last), but only once the pod itself served ``pod_readers`` askers
  of this chunk in the last ``pod_window_s`` — the pod is never idle while peers wait;
* never the asker itself, never an agent already pointed at by ``fanout`` askers in the
  last ``window_s`` (so a receiver becomes the root of a small tree, not a new hot spot);
* nobody left: ``[]`` — the asker goes to the pods, and that counts as a pod read.

*Load* is how many askers of *any* chunk this pod pointed at an agent in the last
:data:`LOAD_WINDOW_S` (about one transfer). An agent's upload slots are shared by every
chunk it holds, so a per-chunk count alone sent askers of many chunks to the same few
agents — the ones that happened to sort or start first — which answered 503 to the
overflow, and each 503 sent its asker to the pods: at N = 32 on 40 Mbit/s links,
about 650 busy answers per pull and the pods carried 5.3× the model.

Why this balances the pods (issue 17, ≤ 1.05 with sharing on): with the rules above a
chunk leaves its pod ``pod_readers`` times per wave of askers, whatever N is and however
the askers interleave, so each pod's bytes follow the bytes it *owns*, which
:func:`cache.ring.place` balances within ``LOAD_FACTOR``. Before, every asker that came
before the first completion announcement went to the pod: a number that depended on
timing per chunk, so the per-pod bytes drifted from the placement (1.13 measured).

Memory is bounded: at most ``max_holders`` agents per chunk (the most recent
announcers) and ``max_objects`` chunks (least recently announced dropped first); the
fan-out and pod-read histories keep only what the window can count. Every method takes
``now_s``; no clock is read here.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

HOLDER_TTL_S = 30.0
# A receiver that died (or stalled) stops being handed out within this.
RECEIVING_TTL_S = 5.0
MAX_HOLDERS_PER_OBJECT = 32
MAX_TRACKED_OBJECTS = 200_000
HOLDERS_PER_ANSWER = 2
# Askers pointed at one agent per window; beyond, the next agent (or the pod).
FANOUT_PER_HOLDER = 4
FANOUT_WINDOW_S = RECEIVING_TTL_S
# Askers of a chunk the pod serves itself before it points askers at receivers.
POD_READERS_BEFORE_RECEIVERS = 1
# Pointings at an agent (any chunk) count toward its load this long: about a transfer.
LOAD_WINDOW_S = 2.0


@dataclass(frozen=True)
class Record:
    """One agent's record for one chunk (seconds on the pod's monotonic clock)."""

    expires_s: float
    receiving: bool
    since_s: float  # first announced (receivers: the earliest is the furthest along)
    pointed_s: tuple[float, ...] = ()  # when askers were pointed at it (the last few)


@dataclass(frozen=True)
class PointingPolicy:
    """How :func:`point` spreads askers (see the module docstring)."""

    limit: int = HOLDERS_PER_ANSWER
    fanout: int = FANOUT_PER_HOLDER
    window_s: float = FANOUT_WINDOW_S
    pod_readers: int = POD_READERS_BEFORE_RECEIVERS
    # Pod reads count this long: a wave of askers (receivers renew past the window).
    pod_window_s: float = HOLDER_TTL_S

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"PointingPolicy.limit must be ≥ 1, got {self.limit}")
        if self.fanout < 1:
            raise ValueError(f"PointingPolicy.fanout must be ≥ 1, got {self.fanout}")
        if self.window_s <= 0:
            raise ValueError(f"PointingPolicy.window_s must be > 0, got {self.window_s}")
        if self.pod_window_s <= 0:
            raise ValueError(f"PointingPolicy.pod_window_s must be > 0, got "
                             f"{self.pod_window_s}")
        if self.pod_readers < 0:
            raise ValueError(f"PointingPolicy.pod_readers must be ≥ 0, got "
                             f"{self.pod_readers}")


def recent(times_s: Sequence[float], now_s: float, window_s: float) -> int:
    """How many of ``times_s`` fall in the window ending at ``now_s``."""
    return sum(1 for t in times_s if now_s - window_s < t <= now_s)


def point(records: Mapping[str, Record], pod_reads_s: Sequence[float], now_s: float, *,
          requester: str | None, policy: PointingPolicy, turn: int = 0,
          load: Mapping[str, int] | None = None) -> list[str]:
    """Whom to point an asker of one chunk at, best first; ``[]``: the pods.

    ``records``: agent → its record for the chunk; ``pod_reads_s``: when askers of it
    were left to the pod; ``turn``: the rotation among complete holders (the caller
    counts answers); ``load``: agent → askers of any chunk recently pointed at it
    (absent: 0). Pure: see the module docstring for the rules.
    """
    load = load or {}
    room = {a: r for a, r in records.items()
            if r.expires_s > now_s and a != requester
            and recent(r.pointed_s, now_s, policy.window_s) < policy.fanout}
    holders = sorted(a for a, r in room.items() if not r.receiving)
    if holders:
        start = turn % len(holders)
        # Stable: the rotation orders holders of equal load.
        holders = sorted(holders[start:] + holders[:start], key=lambda a: load.get(a, 0))
    receivers: list[str] = []
    if recent(pod_reads_s, now_s, policy.pod_window_s) >= policy.pod_readers:
        # Oldest first: a receiver pointed at because it has no load would make the
        # askers a chain (each hop waits for the one before), not a tree.
        receivers = sorted((a for a, r in room.items() if r.receiving),
                           key=lambda a: (load.get(a, 0) >= policy.fanout,
                                          room[a].since_s, a))
    return (holders + receivers)[:policy.limit]


@dataclass(frozen=True)
class Pointing:
    """A holders answer: whom to ask, and which of them are still receiving."""

    holders: tuple[str, ...] = ()
    receiving: tuple[str, ...] = ()


@dataclass
class _Entry:
    agents: OrderedDict[str, Record] = field(default_factory=OrderedDict)
    pod_reads_s: list[float] = field(default_factory=list)
    turn: int = 0


class HolderTracker:
    """The record (see module docstring)."""

    def __init__(self, ttl_s: float = HOLDER_TTL_S,
                 max_holders: int = MAX_HOLDERS_PER_OBJECT,
                 max_objects: int = MAX_TRACKED_OBJECTS, *,
                 receiving_ttl_s: float = RECEIVING_TTL_S,
                 policy: PointingPolicy | None = None) -> None:
        if ttl_s <= 0 or receiving_ttl_s <= 0 or max_holders < 1 or max_objects < 1:
            raise ValueError("HolderTracker: ttl_s and receiving_ttl_s must be > 0, "
                             "max_holders and max_objects ≥ 1")
        self.ttl_s = ttl_s
        self.receiving_ttl_s = receiving_ttl_s
        self.max_holders = max_holders
        self.max_objects = max_objects
        self.policy = policy or PointingPolicy()
        # digest → its entry; both in announce order (oldest first).
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # agent → when askers (of any chunk) were pointed at it, within LOAD_WINDOW_S.
        self._pointed: dict[str, deque[float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, digest: str) -> _Entry:
        entry = self._entries.pop(digest, None) or _Entry()
        self._entries[digest] = entry
        while len(self._entries) > self.max_objects:
            self._entries.popitem(last=False)
        return entry

    def _put(self, entry: _Entry, agent: str, rec: Record) -> None:
        entry.agents.pop(agent, None)
        entry.agents[agent] = rec
        while len(entry.agents) > self.max_holders:
            entry.agents.popitem(last=False)

    def add(self, agent: str, digests: Iterable[str], now_s: float, *,
            receiving: bool = False) -> None:
        """``agent`` holds ``digests`` (complete and verified) as of ``now_s``; with
        ``receiving``: it is receiving them (a renewal of its progress). A receiving
        announcement never downgrades a live holding record."""
        for d in digests:
            entry = self._entry(d)
            old = entry.agents.get(agent)
            if old is not None and old.expires_s <= now_s:
                old = None
            if receiving and old is not None and not old.receiving:
                continue
            ttl = self.receiving_ttl_s if receiving else self.ttl_s
            self._put(entry, agent, Record(
                now_s + ttl, receiving, old.since_s if old else now_s,
                old.pointed_s if old else ()))

    def forget(self, agent: str, digest: str) -> None:
        """``agent``'s copy of ``digest`` was bad (or is gone): stop handing it out."""
        entry = self._entries.get(digest)
        if entry is not None:
            entry.agents.pop(agent, None)
            if not entry.agents and not entry.pod_reads_s:
                del self._entries[digest]

    def _live(self, digest: str, now_s: float) -> _Entry | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        for agent in [a for a, r in entry.agents.items() if r.expires_s <= now_s]:
            del entry.agents[agent]
        entry.pod_reads_s = [t for t in entry.pod_reads_s
                             if now_s - self.policy.pod_window_s < t <= now_s]
        if not entry.agents and not entry.pod_reads_s:
            del self._entries[digest]
            return None
        return entry

    def _load(self, agents: Iterable[str], now_s: float) -> dict[str, int]:
        """Askers pointed at each of ``agents`` within the load window (and drop
        older pointings, so the history stays as small as the window)."""
        out: dict[str, int] = {}
        for a in agents:
            times = self._pointed.get(a)
            if times is None:
                continue
            while times and times[0] <= now_s - LOAD_WINDOW_S:
                times.popleft()
            if times:
                out[a] = len(times)
            else:
                del self._pointed[a]
        return out

    def point(self, digest: str, now_s: float, *, requester: str | None = None,
              receiving: bool = False) -> Pointing:
        """Whom the asker ``requester`` of ``digest`` should ask (:func:`point`), and
        record the answer: the first agent named is pointed at once more, an empty
        answer is a pod read; with ``receiving``, the asker is now receiving it."""
        entry = self._live(digest, now_s)
        found: list[str] = []
        if entry is not None:
            found = point(entry.agents, entry.pod_reads_s, now_s, requester=requester,
                          policy=self.policy, turn=entry.turn,
                          load=self._load(entry.agents, now_s))
            entry.turn += 1
        if found:
            assert entry is not None
            first = entry.agents[found[0]]
            entry.agents[found[0]] = replace(
                first, pointed_s=(*first.pointed_s, now_s)[-self.policy.fanout:])
            self._pointed.setdefault(found[0], deque()).append(now_s)
            if len(self._pointed) > self.max_objects:  # bounded like the records
                self._pointed.pop(next(iter(self._pointed)))
        else:
            entry = entry or self._entry(digest)
            entry.pod_reads_s = [*entry.pod_reads_s, now_s][-max(1, self.policy.pod_readers):]
        if receiving and requester is not None:
            self.add(requester, [digest], now_s, receiving=True)
        agents = entry.agents
        return Pointing(tuple(found), tuple(a for a in found
                                                 if a in agents and agents[a].receiving))

    def holders(self, digest: str, now_s: float, *, exclude: str | None = None,
                limit: int = HOLDERS_PER_ANSWER) -> list[str]:
        """Up to ``limit`` live *complete* holders of ``digest`` (not ``exclude``),
        rotating; records nothing but the rotation."""
        entry = self._live(digest, now_s)
        if entry is None:
            return []
        live = [a for a, r in entry.agents.items() if not r.receiving and a != exclude]
        if not live:
            return []
        start = entry.turn % len(live)
        entry.turn += 1
        return (live[start:] + live[:start])[:limit]

    def expire(self, now_s: float) -> int:
        """Drop every record past its time; returns how many chunk entries went."""
        gone = 0
        for d in list(self._entries):
            if self._live(d, now_s) is None:
                gone += 1
        return gone


__all__ = ["FANOUT_PER_HOLDER", "FANOUT_WINDOW_S", "HOLDERS_PER_ANSWER", "HOLDER_TTL_S",
           "LOAD_WINDOW_S",
           "POD_READERS_BEFORE_RECEIVERS", "RECEIVING_TTL_S", "HolderTracker", "Pointing",
           "PointingPolicy", "Record", "point", "recent"]
