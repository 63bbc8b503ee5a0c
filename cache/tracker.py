"""Which agents hold which chunks: the owning cache pod's short-lived record. Pure.

Agents that verified a chunk into their node cache announce it to the chunk's owning
pod (``POST /v1/holders``); an agent about to fetch a chunk asks the owner for holders
(``GET /v1/holders/{digest}``) and tries them before the pod itself. So when 32 nodes
pull one model at once, the pod's link carries each chunk a few times and the nodes'
links carry the rest (Dragonfly's and Kraken's trick), while the requester still
verifies every byte.

Records expire after ``ttl_s`` unless announced again: an agent that went away, or
evicted the chunk, stops being handed out within that time (and a requester that finds
it gone just asks the next source). Memory is bounded: at most ``max_holders`` agents
per chunk (the most recent announcers) and ``max_objects`` chunks (least recently
announced dropped first).

Spreading load: each answer hands out at most ``limit`` holders, rotating through the
live ones, so concurrent requesters of one chunk are spread over every holder instead
of all asking the first. Every method takes ``now_s``; no clock is read here.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

HOLDER_TTL_S = 30.0
MAX_HOLDERS_PER_OBJECT = 32
MAX_TRACKED_OBJECTS = 200_000
HOLDERS_PER_ANSWER = 2


class HolderTracker:
    """The record (see module docstring)."""

    def __init__(self, ttl_s: float = HOLDER_TTL_S,
                 max_holders: int = MAX_HOLDERS_PER_OBJECT,
                 max_objects: int = MAX_TRACKED_OBJECTS) -> None:
        if ttl_s <= 0 or max_holders < 1 or max_objects < 1:
            raise ValueError("HolderTracker: ttl_s must be > 0, max_holders and "
                             "max_objects ≥ 1")
        self.ttl_s = ttl_s
        self.max_holders = max_holders
        self.max_objects = max_objects
        # digest → {agent: expires_at}, both in announce order (oldest first).
        self._holders: OrderedDict[str, OrderedDict[str, float]] = OrderedDict()
        self._turn: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._holders)

    def add(self, agent: str, digests: Iterable[str], now_s: float) -> None:
        """``agent`` holds ``digests`` (complete and verified) as of ``now_s``."""
        expires = now_s + self.ttl_s
        for d in digests:
            rec = self._holders.pop(d, None) or OrderedDict()
            rec.pop(agent, None)
            rec[agent] = expires
            while len(rec) > self.max_holders:
                rec.popitem(last=False)
            self._holders[d] = rec
        while len(self._holders) > self.max_objects:
            old, _ = self._holders.popitem(last=False)
            self._turn.pop(old, None)

    def forget(self, agent: str, digest: str) -> None:
        """``agent``'s copy of ``digest`` was bad (or is gone): stop handing it out."""
        rec = self._holders.get(digest)
        if rec is not None:
            rec.pop(agent, None)
            if not rec:
                del self._holders[digest]
                self._turn.pop(digest, None)

    def holders(self, digest: str, now_s: float, *, exclude: str | None = None,
                limit: int = HOLDERS_PER_ANSWER) -> list[str]:
        """Up to ``limit`` live holders of ``digest`` (not ``exclude``), rotating."""
        rec = self._holders.get(digest)
        if rec is None:
            return []
        for agent in [a for a, t in rec.items() if t <= now_s]:
            del rec[agent]
        if not rec:
            del self._holders[digest]
            self._turn.pop(digest, None)
            return []
        live = [a for a in rec if a != exclude]
        if not live:
            return []
        turn = self._turn.get(digest, 0)
        self._turn[digest] = turn + 1
        start = turn % len(live)
        return (live[start:] + live[:start])[:limit]

    def expire(self, now_s: float) -> int:
        """Drop every record past its time; returns how many chunk records went."""
        gone = 0
        for d in list(self._holders):
            rec = self._holders[d]
            for agent in [a for a, t in rec.items() if t <= now_s]:
                del rec[agent]
            if not rec:
                del self._holders[d]
                self._turn.pop(d, None)
                gone += 1
        return gone


__all__ = ["HOLDERS_PER_ANSWER", "HOLDER_TTL_S", "HolderTracker"]
