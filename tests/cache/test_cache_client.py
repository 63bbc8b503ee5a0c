"""The ring client: rendezvous placement, failover across real cache peers, strict
origin, store fallback, invalidation reports, manifests and refs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bdn.retry import RetryPolicy
from bdn.store import BlobStore
from cache.client import RingClient, RingClientOptions
from cache.errors import CacheNotFoundError, CacheUnavailableError, RangeNotSatisfiableError
from cache.ring import rendezvous_order
from manifests.digest import Digest
from manifests.manifest import Chunk, FileEntry, build_manifest
from manifests.refs import Ref
from tests.cache.conftest import StartCache, http_get, metrics, put_object
from tests.support.procs import free_port

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


async def test_one_of_three_peers_down_clients_use_the_next(
        store: BlobStore, start_cache: StartCache, tmp_path: Path) -> None:
    procs = [start_cache(store.url) for _ in range(3)]
    urls = [p.url for p in procs]
    assert all(urls)
    objs = {}
    for _ in range(24):
        data = os.urandom(100_000)
        objs[put_object(store, data)] = data
    down = procs[1]
    down.stop()
    client = RingClient(RingClientOptions(peers=tuple(urls), retry=FAST,  # type: ignore[arg-type]
                                          strict_origin=True))
    try:
        owned_by_down = 0
        for digest, data in objs.items():
            order = client.owners(digest)
            res = await client.read(digest)
            assert res.data == data and res.tier == "cluster"
            if order[0] == down.url:
                owned_by_down += 1
                assert res.peer == order[1]  # transparently the next peer on the ring
            else:
                assert res.peer == order[0]
            part = await client.read(digest, 10, 20_000)
            assert part.data == data[10:20_000]
        assert owned_by_down > 0
    finally:
        await client.close()
    for url in urls:
        if url != down.url:
            assert metrics(url)["bdn_cache_store_object_reads_total"] > 0


async def test_strict_origin_fails_naming_peers_else_store_fallback(
        store: BlobStore) -> None:
    data = os.urandom(50_000)
    digest = put_object(store, data)
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    strict = RingClient(RingClientOptions(peers=tuple(dead), retry=FAST, strict_origin=True),
                        store=store)
    try:
        with pytest.raises(CacheUnavailableError) as e:
            await strict.read(digest)
        assert set(e.value.peers_tried) == set(dead) and str(digest) in str(e.value)
        assert all(p in str(e.value) for p in dead)
    finally:
        await strict.close()
    loose = RingClient(RingClientOptions(peers=tuple(dead), retry=FAST), store=store)
    try:
        res = await loose.read(digest, 5, 500)
        assert (res.data, res.tier, res.peer) == (data[5:500], "store", None)
        assert (await loose.read(digest)).data == data
        with pytest.raises(CacheNotFoundError):
            await loose.read(Digest.of(b"absent"))
        with pytest.raises(RangeNotSatisfiableError):
            await loose.read(digest, len(data), None)
    finally:
        await loose.close()


async def test_uncached_object_with_store_down_is_retried_then_fails_over(
        store: BlobStore, start_cache: StartCache, start_store_http) -> None:  # type: ignore[no-untyped-def]
    # The peer answers 503 (its store is down); strict clients give up naming it,
    # others read the store themselves.
    data = os.urandom(10_000)
    digest = put_object(store, data)
    origin = start_store_http(store.url)
    cache = start_cache(origin.url)
    origin.stop()
    strict = RingClient(RingClientOptions(peers=(cache.url,), retry=FAST,
                                          strict_origin=True))
    try:
        with pytest.raises(CacheUnavailableError) as e:
            await strict.read(digest)
        assert "503" in str(e.value) and e.value.peers_tried == (cache.url, cache.url)
    finally:
        await strict.close()
    async with RingClient(RingClientOptions(peers=(cache.url,), retry=FAST),
                          store=store) as loose:
        res = await loose.read(digest)
        assert res.data == data and res.tier == "store"


async def test_not_found_and_416_from_peers(store: BlobStore, start_cache: StartCache) -> None:
    data = os.urandom(1000)
    digest = put_object(store, data)
    cache = start_cache(store.url)
    async with RingClient(RingClientOptions(peers=(cache.url,), retry=FAST)) as client:
        with pytest.raises(CacheNotFoundError) as e:
            await client.read(Digest.of(b"nope"))
        assert str(Digest.of(b"nope")) in str(e.value)
        with pytest.raises(RangeNotSatisfiableError) as r:
            await client.read(digest, 1000)
        assert r.value.size == 1000


async def test_read_into_streams_with_absolute_offsets(store: BlobStore,
                                                       start_cache: StartCache) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    digest = put_object(store, data)
    cache = start_cache(store.url)
    buf = bytearray(len(data))
    calls = []

    async def sink(offset: int, block: bytes) -> None:
        calls.append(offset)
        buf[offset:offset + len(block)] = block

    async with RingClient(RingClientOptions(peers=(cache.url,))) as client:
        info = await client.read_into(digest, sink, 1000)
    assert info.length == len(data) - 1000 and info.tier == "cluster"
    assert bytes(buf[1000:]) == data[1000:] and calls[0] == 1000 and len(calls) > 1


async def test_report_bad_makes_the_peer_drop_its_copy(
        store: BlobStore, start_cache: StartCache, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    digest = put_object(store, data)
    cache_dir = tmp_path / "peer"
    cache = start_cache(store.url, cache_dir)
    async with RingClient(RingClientOptions(peers=(cache.url,))) as client:
        assert (await client.read(digest)).data == data
        on_disk = cache_dir / "objects" / digest.hex[:2] / digest.hex[2:4] / digest.hex
        with open(on_disk, "r+b") as f:
            f.write(b"rot")
        bad = await client.read(digest)
        assert Digest.of(bad.data) != digest  # what the agent would detect
        await client.report_bad(digest, bad.peer or "")
        assert metrics(cache.url)["bdn_cache_invalidations_total"] == 1
        assert (await client.read(digest)).data == data
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
    data = os.urandom(1000)
    digest = put_object(store, data)
    cache = start_cache(store.url)
    port = int(cache.url.rsplit(":", 1)[1])
    async with RingClient(RingClientOptions(dns_name="localhost", dns_port=port, retry=FAST,
                                            strict_origin=True)) as client:
        peers = await client.refresh_peers()
        assert f"http://127.0.0.1:{port}" in peers
        res = await client.read(digest)
        assert res.data == data and res.tier == "cluster"
