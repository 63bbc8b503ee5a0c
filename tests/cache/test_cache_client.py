"""The ring client: rendezvous placement, failover across real cache peers, strict
origin, store fallback, invalidation reports, manifests and refs. (Chunk bytes go
through agent/fetch.py, tested in tests/agent/.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bdn.retry import RetryPolicy
from bdn.store import BlobStore
from cache.client import RingClient, RingClientOptions
from cache.errors import CacheNotFoundError, CacheUnavailableError
from cache.ring import rendezvous_order
from manifests.digest import Digest
from manifests.manifest import Chunk, FileEntry, build_manifest
from manifests.refs import Ref
from tests.support.cache import StartCache, metrics, put_object
from tests.support.http import http_get
from tests.support.procs import free_port

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

FAST = RetryPolicy(attempts=2, base_delay_s=0.01, max_delay_s=0.05)
PEERS = [f"http://10.0.0.{i}:8401" for i in range(1, 6)]


def test_rendezvous_is_deterministic_and_moves_only_the_removed_peers_keys() -> None:
    keys = [str(Digest.of(str(i).encode())) for i in range(2000)]
    before = {k: rendezvous_order(PEERS, k) for k in keys}
    assert all(rendezvous_order(list(reversed(PEERS)), k) == before[k] for k in keys[:50])
    owners = [o[0] for o in before.values()]
    assert all(owners.count(p) > 2000 / len(PEERS) / 2 for p in PEERS)  # spread out
    gone = PEERS[2]
    rest = [p for p in PEERS if p != gone]
    for k in keys:
        after = rendezvous_order(rest, k)
        # Every key keeps its order among the remaining peers: only `gone`'s keys move,
        # and they move to what was their second choice.
        assert after == [p for p in before[k] if p != gone]


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        RingClientOptions(peers=("ftp://x",))
    with pytest.raises(ValueError):
        RingClientOptions(peers="http://a:1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RingClient(RingClientOptions(strict_origin=True))
    opts = RingClientOptions(peers=("http://a:1/",))
    assert opts.peers == ("http://a:1",)


def _put_manifest(store: BlobStore, size: int = 1000) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    entry = FileEntry.from_chunks("a.bin", (Chunk(put_object(store, data), 0, size),))
    mdigest = store.put_manifest(build_manifest([entry], {"uri": "test://a"}))
    return mdigest, store.get_manifest_bytes(mdigest)


async def test_one_of_three_peers_down_clients_use_the_next(
        store: BlobStore, start_cache: StartCache, tmp_path: Path) -> None:
    procs = [start_cache(store.url) for _ in range(3)]
    urls = [p.url for p in procs]
    assert all(urls)
    manifests = dict(_put_manifest(store) for _ in range(24))
    down = procs[1]
    down.stop()
    client = RingClient(RingClientOptions(peers=tuple(urls), retry=FAST,  # type: ignore[arg-type]
                                          strict_origin=True))
    try:
        owned_by_down = 0
        for mdigest, raw in manifests.items():
            order = client.owners(mdigest)
            assert await client.get_manifest_bytes(mdigest) == raw
            owned_by_down += order[0] == down.url
        assert owned_by_down > 0
    finally:
        await client.close()
    # Transparently the next peer on the ring: each live peer filled what it owns and
    # what it was next in line for.
    for url in urls:
        if url != down.url:
            assert metrics(url)["bdn_cache_misses_total"] > 0


async def test_strict_origin_fails_naming_peers_else_store_fallback(
        store: BlobStore) -> None:
    mdigest, raw = _put_manifest(store)
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    strict = RingClient(RingClientOptions(peers=tuple(dead), retry=FAST, strict_origin=True),
                        store=store)
    try:
        with pytest.raises(CacheUnavailableError) as e:
            await strict.get_manifest_bytes(mdigest)
        assert set(e.value.peers_tried) == set(dead) and str(mdigest) in str(e.value)
        assert all(p in str(e.value) for p in dead)
    finally:
        await strict.close()
    loose = RingClient(RingClientOptions(peers=tuple(dead), retry=FAST), store=store)
    try:
        assert await loose.get_manifest_bytes(mdigest) == raw
        with pytest.raises(CacheNotFoundError):
            await loose.get_manifest_bytes(Digest.of(b"absent"))
    finally:
        await loose.close()


async def test_uncached_manifest_with_store_down_is_retried_then_fails_over(
        store: BlobStore, start_cache: StartCache, start_store_http) -> None:  # type: ignore[no-untyped-def]
    # The peer answers 503 (its store is down); strict clients give up naming it,
    # others read the store themselves.
    mdigest, raw = _put_manifest(store)
    origin = start_store_http(store.url)
    cache = start_cache(origin.url)
    origin.stop()
    strict = RingClient(RingClientOptions(peers=(cache.url,), retry=FAST,
                                          strict_origin=True))
    try:
        with pytest.raises(CacheUnavailableError) as e:
            await strict.get_manifest_bytes(mdigest)
        assert "503" in str(e.value) and e.value.peers_tried == (cache.url, cache.url)
    finally:
        await strict.close()
    async with RingClient(RingClientOptions(peers=(cache.url,), retry=FAST),
                          store=store) as loose:
        assert await loose.get_manifest_bytes(mdigest) == raw


async def test_not_found_from_peers(store: BlobStore, start_cache: StartCache) -> None:
    cache = start_cache(store.url)
    async with RingClient(RingClientOptions(peers=(cache.url,), retry=FAST)) as client:
        with pytest.raises(CacheNotFoundError) as e:
            await client.get_manifest_bytes(Digest.of(b"nope"))
        assert str(Digest.of(b"nope")) in str(e.value)


async def test_report_bad_makes_the_peer_drop_its_copy(
        store: BlobStore, start_cache: StartCache, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    digest = put_object(store, data)
    cache_dir = tmp_path / "peer"
    cache = start_cache(store.url, cache_dir)
    url = f"{cache.url}/v1/objects/{digest}"
    async with RingClient(RingClientOptions(peers=(cache.url,))) as client:
        assert http_get(url)[2] == data
        on_disk = cache_dir / "objects" / digest.hex[:2] / digest.hex[2:4] / digest.hex
        with open(on_disk, "r+b") as f:
            f.write(b"rot")
        bad = http_get(url)[2]
        assert Digest.of(bad) != digest  # what the agent would detect
        await client.report_bad(digest, cache.url or "")
        assert metrics(cache.url)["bdn_cache_invalidations_total"] == 1
        assert http_get(url)[2] == data
        await client.report_bad(digest, f"http://127.0.0.1:{free_port()}")  # no raise


async def test_manifests_and_refs_through_peers_and_store(
        store: BlobStore, start_cache: StartCache) -> None:
    data = os.urandom(1000)
    entry = FileEntry.from_chunks("a.bin", (Chunk(put_object(store, data), 0, 1000),))
    mdigest = store.put_manifest(build_manifest([entry], {"uri": "test://a"}))
    ref = Ref.parse("ns/a:v1")
    store.set_ref(ref, mdigest)
    cache = start_cache(store.url)
    async with RingClient(RingClientOptions(peers=(cache.url,), retry=FAST)) as client:
        assert Digest.of(await client.get_manifest_bytes(mdigest)) == mdigest
        assert await client.resolve_ref(ref) == mdigest
        with pytest.raises(CacheNotFoundError):
            await client.resolve_ref(Ref.parse("ns/a:missing"))
    dead = (f"http://127.0.0.1:{free_port()}",)
    async with RingClient(RingClientOptions(peers=dead, retry=FAST), store=store) as client:
        assert Digest.of(await client.get_manifest_bytes(mdigest)) == mdigest
        assert await client.resolve_ref(ref) == mdigest
    assert http_get(f"{cache.url}/v1/refs/ns/a/v1")[0] == 200


async def test_peers_from_a_dns_name(store: BlobStore, start_cache: StartCache) -> None:
    mdigest, raw = _put_manifest(store)
    cache = start_cache(store.url)
    port = int(cache.url.rsplit(":", 1)[1])
    async with RingClient(RingClientOptions(dns_name="localhost", dns_port=port, retry=FAST,
                                            strict_origin=True)) as client:
        peers = await client.refresh_peers()
        assert f"http://127.0.0.1:{port}" in peers
        assert await client.get_manifest_bytes(mdigest) == raw
