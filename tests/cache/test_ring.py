"""One ring: every caller (the agent's fetcher, the ring client, the cache's prefetch)
agrees on owners, and bounded-load placement keeps bytes per pod within 5 % of the mean.

Property tests (hypothesis) over the pure placement in ``cache/ring.py``; one process
test asks three real cache servers to prefetch with ``peers``/``self`` and checks each
queues exactly the objects the placement gives it.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.fetch import Fetcher
from agent.options import AgentOptions
from bdn.store import BlobStore
from cache.client import RingClient, RingClientOptions
from cache.ring import (
    LOAD_FACTOR,
    digest_key,
    manifest_objects,
    place,
    ref_key,
    rendezvous_order,
)
from manifests.digest import Digest
from manifests.manifest import Chunk, FileEntry, build_manifest
from tests.support.cache import StartCache, put_object
from tests.support.http import post_json

MiB = 1024 * 1024

peer_urls = st.lists(st.integers(1, 250).map(lambda i: f"http://10.1.0.{i}:8401"),
                     min_size=1, max_size=8, unique=True)


def _manifest(sizes: list[int], seed: int) -> tuple[list[Chunk], object]:
    rng = random.Random(seed)
    chunks = []
    off = 0
    for size in sizes:
        # Digests of distinct random labels: placement only hashes the digest string.
        d = Digest.of(rng.randbytes(16))
        chunks.append(Chunk(d, off, size))
        off += size
    entry = FileEntry.from_chunks("model.safetensors", chunks)
    return chunks, build_manifest([entry], {"uri": "test://ring"})


@settings(max_examples=60, deadline=None)
@given(peers=peer_urls, sizes=st.lists(st.integers(1, 16 * MiB), min_size=1, max_size=80),
       seed=st.integers(0, 2**32), shuffle=st.randoms(use_true_random=False))
def test_every_caller_agrees_on_owners(peers: list[str], sizes: list[int], seed: int,
                                       shuffle: random.Random) -> None:
    chunks, manifest = _manifest(sizes, seed)
    mdigest = Digest.of(b"manifest %d" % seed)
    # The cache's prefetch: place() over the manifest's objects, peers as posted.
    prefetch = place(peers, manifest_objects(manifest))  # type: ignore[arg-type]
    # Another caller sees the peers and the objects in another order.
    shuffled_peers = list(peers)
    shuffle.shuffle(shuffled_peers)
    objects = manifest_objects(manifest)  # type: ignore[arg-type]
    shuffle.shuffle(objects)
    other = place(shuffled_peers, objects)
    # The agent: RingClient.owners after it read the manifest, and the fetcher's sources.
    ring = RingClient(RingClientOptions(peers=tuple(shuffled_peers), strict_origin=True))
    ring.remember(mdigest, manifest)  # type: ignore[arg-type]
    fetcher = Fetcher(AgentOptions(cache_dir=Path("/nonexistent"), budget_bytes=0,
                                   peers=tuple(peers), strict=True), None,
                      owners=ring.owners)
    for c in chunks:
        key = digest_key(c.digest)
        owner = prefetch.owner(key)
        assert other.owner(key) == owner
        assert ring.owners(c.digest)[0] == owner
        assert fetcher.sources(c)[0] == owner
        # The failover order is every peer once, the owner first.
        assert sorted(ring.owners(c.digest)) == sorted(peers)
    # Keys outside a manifest (manifests, refs) are plain rendezvous, for every caller.
    assert ring.owners(mdigest) == rendezvous_order(peers, digest_key(mdigest))
    assert ref_key("ns/m:t") != digest_key(mdigest)


@settings(max_examples=80, deadline=None)
@given(n_peers=st.integers(2, 3), n_chunks=st.integers(64, 300), seed=st.integers(0, 2**32),
       small=st.integers(1, 16 * MiB))
def test_bounded_loads_keep_every_pod_within_5_percent_of_the_mean(
        n_peers: int, n_chunks: int, seed: int, small: int) -> None:
    """A model of ≥ 64 chunks shaped like the chunker's output (16 MiB tensor pieces and
    smaller groups) on the issue's 3 pods (or 2): max ÷ mean ≤ 1.05."""
    rng = random.Random(seed)
    peers = [f"http://10.2.0.{i}:8401" for i in range(n_peers)]
    objects = [(digest_key(Digest.of(rng.randbytes(16))),
                16 * MiB if rng.random() < 0.8 else rng.randint(small // 2 + 1, small))
               for _ in range(n_chunks)]
    pl = place(peers, objects)
    loads = pl.bytes_by_peer(objects)
    mean = sum(size for _, size in objects) / n_peers
    largest = max(size for _, size in objects)
    # The general bound, whatever the sizes; with ≥ 21 chunks a pod and chunks of at
    # most 16 MiB it is the 5 % of the issue.
    assert max(loads.values()) <= max(LOAD_FACTOR * mean, mean + largest)
    if largest <= (LOAD_FACTOR - 1) * mean:
        assert max(loads.values()) <= LOAD_FACTOR * mean


@settings(max_examples=40, deadline=None)
@given(peers=peer_urls, sizes=st.lists(st.integers(0, 4 * MiB), max_size=60))
def test_placement_is_a_function_of_the_sets_only(peers: list[str], sizes: list[int]) -> None:
    objects = [(f"b3:{i:064x}", s) for i, s in enumerate(sizes)]
    a = place(peers, objects)
    b = place(list(reversed(peers)) + peers[:1], list(reversed(objects)))
    assert dict(a.owner_of) == dict(b.owner_of)
    for key, _ in objects:
        assert a.order(key) == b.order(key) and a.order(key)[0] == a.owner(key)


def test_plain_rendezvous_is_unbalanced_which_is_why_manifests_are_placed() -> None:
    rng = random.Random(7)
    peers = [f"http://10.3.0.{i}:8401" for i in range(3)]
    worst_plain = 0.0
    for _ in range(20):
        objects = [(digest_key(Digest.of(rng.randbytes(8))), 16 * MiB) for _ in range(64)]
        plain = dict.fromkeys(peers, 0)
        for key, size in objects:
            plain[rendezvous_order(peers, key)[0]] += size
        mean = 64 * 16 * MiB / 3
        worst_plain = max(worst_plain, max(plain.values()) / mean)
        assert max(place(peers, objects).bytes_by_peer(objects).values()) / mean <= 1.05
    assert worst_plain > 1.05


@pytest.mark.slow
def test_three_cache_pods_prefetch_exactly_what_the_placement_gives_them(
        store: BlobStore, start_cache: StartCache) -> None:
    chunks = []
    off = 0
    rng = random.Random(3)
    for _ in range(64):
        data = rng.randbytes(rng.randint(1000, 3000))
        chunks.append(Chunk(put_object(store, data), off, len(data)))
        off += len(data)
    manifest = build_manifest([FileEntry.from_chunks("w.bin", chunks)], {"uri": "test://p"})
    mdigest = store.put_manifest(manifest)
    caches = [start_cache(store.url, prefetch_rate=1024) for _ in range(3)]
    urls = [c.url for c in caches]
    placement = place(urls, manifest_objects(manifest))
    owned = placement.bytes_by_peer((k, 1) for k, _ in manifest_objects(manifest))
    ring = RingClient(RingClientOptions(peers=tuple(reversed(urls)), strict_origin=True))
    ring.remember(mdigest, manifest)
    for url in urls:
        status, body = post_json(f"{url}/v1/prefetch",
                                 {"manifest": str(mdigest), "peers": urls, "self": url})
        assert status == 202 and body["queued"] == owned[url], (url, body)
        assert owned[url] == sum(1 for c in chunks if ring.owners(c.digest)[0] == url)
    assert sum(owned.values()) == 64
    asyncio.run(ring.close())
