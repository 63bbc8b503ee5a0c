"""Which cached objects to evict: least recently used first, under a byte budget.

A pure function of its inputs and an explicit ``now`` (DESIGN.md: policies are pure, the
services around them do the I/O), so every case — pinned objects, an object larger than
the budget, clocks that stepped backwards — is tested without a disk or a clock.

Rules:

- Make room for ``incoming_bytes`` so that ``used - freed + incoming ≤ budget``.
- Never choose a pinned object (one being read): its bytes stay where its reader is.
- Least recently used first; ties broken by key so the plan is deterministic.
- A last-access time in the future (the clock stepped back, or an index from another
  machine) counts as ``now``: otherwise such an object would outlive everything else.
- If room cannot be made (the object is larger than the budget, or too much is pinned),
  evict nothing and say so: evicting part of what is needed would lose cached objects
  and still not fit. The caller then serves the object without keeping it.

The budget is what the operator allows; the disk may hold less (it is shared, or
smaller than the budget says). :func:`disk_capacity` is the bytes the cache can really
hold — what it has on disk plus what the file system has free, less headroom — and the
caller plans against the smaller of the two, so a full disk evicts instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    """A complete cached object as the policy sees it."""

    key: str
    size: int
    last_access: float
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    """``victims`` to remove (in order); ``fits``: whether the incoming object fits then."""

    victims: tuple[str, ...]
    freed_bytes: int
    fits: bool


def plan_eviction(candidates: Iterable[Candidate], *, used_bytes: int, incoming_bytes: int,
                  budget_bytes: int, now: float) -> EvictionPlan:
    """Choose the least recently used unpinned objects to make ``incoming_bytes`` fit."""
    if used_bytes < 0 or incoming_bytes < 0 or budget_bytes < 0:
        raise ValueError("plan_eviction: byte counts must be ≥ 0")
    if incoming_bytes > budget_bytes:
        return EvictionPlan((), 0, False)
    need = used_bytes + incoming_bytes - budget_bytes
    if need <= 0:
        return EvictionPlan((), 0, True)
    order = sorted((c for c in candidates if not c.pinned),
                   key=lambda c: (min(c.last_access, now), c.key))
    victims: list[str] = []
    freed = 0
    for c in order:
        if freed >= need:
            break
        victims.append(c.key)
        freed += c.size
    if freed < need:
        return EvictionPlan((), 0, False)
    return EvictionPlan(tuple(victims), freed, True)


def disk_capacity(budget_bytes: int, *, cached_bytes: int, disk_free_bytes: int,
                  headroom_bytes: int = 0) -> int:
    """The bytes a cache may hold: its budget, or less when the file system under it
    cannot hold that much (``cached_bytes`` are on it already and freed by eviction;
    ``headroom_bytes`` stay free for whatever else the cache writes there)."""
    if min(budget_bytes, cached_bytes, disk_free_bytes, headroom_bytes) < 0:
        raise ValueError("disk_capacity: byte counts must be ≥ 0")
    return max(0, min(budget_bytes, cached_bytes + disk_free_bytes - headroom_bytes))
