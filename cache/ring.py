"""Ring placement: which cache pod owns an object, for every caller. Pure.

One placement function and one key format, so the agent, the cache's prefetch and the
tests can never disagree about owners (they used to: two rendezvous functions with two
key formats). Nothing here does I/O; the peer list (static URLs plus a DNS answer)
lives in :class:`cache.client.RingClient`, which callers pass in.

Two layers:

* :func:`rendezvous_order` — highest-random-weight hashing with xxh3 over
  ``peer + NUL + key``: every caller computes the same order from the same peer set
  (input order and duplicates do not matter), removing a peer moves only the keys it
  owned, and the order after the owner is the failover order. Used alone for anything
  asked one at a time (manifests, refs, an object outside any manifest).
* :func:`place` — rendezvous with *bounded loads* over a whole manifest's objects:
  plain per-key hashing of a manifest's few dozen chunks leaves the busiest pod well
  above the mean (the binomial spread of a few draws per pod; ``bench/fleet.py``), so
  each object, largest first, goes to the first peer in its rendezvous order whose
  bytes stay within ``load_factor`` × the mean. The result depends only on the peer set
  and the set of ``(key, size)`` pairs — not on their order — so an agent and a cache
  pod that read the same manifest agree. An object shared by two manifests may be
  owned by different pods in each; that costs at most one extra fill, never a wrong
  byte (every pod can serve every object).

Keys: :func:`digest_key` for objects and manifests (the ``b3:<hex>`` digest string) and
:func:`ref_key` for refs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import xxhash

from manifests.manifest import Manifest

# Bytes on the busiest pod may exceed the mean by this factor (the 5 %) before
# an object is pushed past its first choice.
LOAD_FACTOR = 1.05


def digest_key(digest: object) -> str:
    """The ring key of an object or manifest: its ``b3:<hex>`` digest string."""
    return str(digest)


def ref_key(ref: object) -> str:
    """The ring key of a ref (``ns/model:tag``), distinct from every digest key."""
    return f"ref:{ref}"


def weight(peer: str, key: str) -> int:
    """The rendezvous weight of ``peer`` for ``key`` (64-bit xxh3; not adversarial)."""
    return xxhash.xxh3_64_intdigest(peer.encode() + b"\0" + key.encode())


def rendezvous_order(peers: Iterable[str], key: str) -> list[str]:
    """Peers by descending weight for ``key`` (the owner first); ties broken by name."""
    scored = [(weight(p, key), p) for p in set(peers)]
    scored.sort(key=lambda sp: (-sp[0], sp[1]))
    return [p for _, p in scored]


@dataclass(frozen=True)
class Placement:
    """Owners of a set of objects on one peer set; :meth:`order` is the failover order."""

    peers: tuple[str, ...]
    owner_of: Mapping[str, str] = field(default_factory=dict)

    def owner(self, key: str) -> str | None:
        if not self.peers:
            return None
        owner = self.owner_of.get(key)
        return owner if owner is not None else rendezvous_order(self.peers, key)[0]

    def order(self, key: str) -> list[str]:
        """The owner first, then the other peers in ``key``'s rendezvous order."""
        ring = rendezvous_order(self.peers, key)
        owner = self.owner_of.get(key)
        if owner is None or owner not in ring:
            return ring
        return [owner] + [p for p in ring if p != owner]

    def bytes_by_peer(self, objects: Iterable[tuple[str, int]]) -> dict[str, int]:
        """Bytes each peer owns among ``objects`` (each distinct key counted once)."""
        out = dict.fromkeys(self.peers, 0)
        for key, size in dict(objects).items():
            owner = self.owner(key)
            if owner is not None:
                out[owner] += size
        return out


def place(peers: Iterable[str], objects: Iterable[tuple[str, int]], *,
          load_factor: float = LOAD_FACTOR) -> Placement:
    """Bounded-load rendezvous placement of ``objects`` (``(key, size)``) on ``peers``.

    Deterministic in the *sets* of peers and objects. Each object, largest first (ties
    by key), goes to the first peer in its rendezvous order whose load stays within
    ``load_factor`` × total ÷ peers; if none has room, to the least loaded peer
    (earliest in its rendezvous order among equals). So the busiest pod holds at most
    ``max(load_factor × mean, mean + the largest object)``.
    """
    if load_factor < 1.0:
        raise ValueError(f"place: load_factor must be ≥ 1, got {load_factor}")
    ring = tuple(sorted(set(peers)))
    if not ring:
        return Placement(())
    sizes: dict[str, int] = {}
    for key, size in objects:
        if size < 0:
            raise ValueError(f"place: object {key!r} has a negative size {size}")
        sizes[key] = size
    total = sum(sizes.values())
    cap = load_factor * total / len(ring)
    load = dict.fromkeys(ring, 0)
    owner_of: dict[str, str] = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        size = sizes[key]
        order = rendezvous_order(ring, key)
        chosen = next((p for p in order if load[p] + size <= cap), None)
        if chosen is None:
            chosen = min(order, key=lambda p: load[p])  # stable: earliest among equals
        load[chosen] += size
        owner_of[key] = chosen
    return Placement(ring, owner_of)


def manifest_objects(manifest: Manifest) -> list[tuple[str, int]]:
    """The ``(key, size)`` pairs :func:`place` balances for ``manifest``: its distinct
    chunks, all of them (not just the files one pull selects), so every caller that
    reads the manifest places the same set."""
    return [(digest_key(d), c.length) for d, c in manifest.unique_chunks().items()]


def owners_of(placement: Placement | None, peers: Sequence[str], key: str) -> list[str]:
    """``key``'s failover order: from ``placement`` when it covers the same peer set,
    else plain rendezvous over ``peers`` (a placement made before the ring changed)."""
    if placement is not None and set(placement.peers) == set(peers):
        return placement.order(key)
    return rendezvous_order(peers, key)


__all__ = [
    "LOAD_FACTOR",
    "Placement",
    "digest_key",
    "manifest_objects",
    "owners_of",
    "place",
    "ref_key",
    "rendezvous_order",
    "weight",
]
