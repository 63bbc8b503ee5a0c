"""The cache server end to end: real processes on loopback, bytes and digests compared.

Coalescing, faults (store down, corrupt object, kill -9 mid-fill), invalidation,
eviction under a budget with readers pinning, prefetch, refs and manifests.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
import urllib.parse
from pathlib import Path

import aiohttp
import pytest

from bdn.errors import StoreError
from bdn.store import BlobStore, FsspecBackend, object_key
from cache.server import parse_metrics
from manifests.digest import Digest, Hasher
from manifests.manifest import Chunk, FileEntry, build_manifest
from manifests.refs import Ref
from tests.support.cache import StartCache, metrics, put_object
from tests.support.http import BROKEN, http_get, post_json, slow_reader
from tests.support.procs import free_port

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

MIB = 1024 * 1024


def cached_files(cache_dir: Path) -> dict[str, int]:
    """Object bytes the cache holds on disk (complete and partial; not the index)."""
    out = {}
    for sub in ("objects", "partial"):
        for p in (cache_dir / sub).rglob("*"):
            if p.is_file():
                out[p.name] = p.stat().st_size
    return out


async def fetch(session: aiohttp.ClientSession, url: str,
                headers: dict[str, str] | None = None) -> tuple[str, int, Digest | bytes]:
    """("ok", status, digest-of-body) or ("broken", status, error text)."""
    try:
        async with session.get(url, headers=headers or {}) as resp:
            h = Hasher()
            async for block in resp.content.iter_chunked(MIB):
                h.update(block)
            if resp.status >= 400:
                return "ok", resp.status, b""
            return "ok", resp.status, h.digest()
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError) as e:
        return "broken", 0, str(e).encode()


async def test_64_concurrent_clients_cause_one_store_read(store: BlobStore,
                                                          start_cache: StartCache) -> None:
    data = os.urandom(64 * MIB)
    digest = put_object(store, data)
    del data
    cache = start_cache(store.url)
    url = f"{cache.url}/v1/objects/{digest}"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(fetch(session, url) for _ in range(64)))
    assert all(r == ("ok", 200, digest) for r in results), results[:3]
    m = metrics(cache.url)
    assert m["bdn_cache_store_object_reads_total"] == 1
    assert m["bdn_cache_misses_total"] == 1
    assert m["bdn_cache_coalesced_waiters_total"] + m["bdn_cache_hits_total"] == 63
    assert m["bdn_cache_coalesced_waiters_total"] > 0
    assert m["bdn_cache_bytes_filled_total"] == 64 * MIB
    assert m["bdn_cache_bytes_served_total"] == 64 * 64 * MIB


def test_store_down_cached_objects_still_served(tmp_path: Path, store: BlobStore,
                                                start_cache: StartCache,
                                                start_store_http) -> None:  # type: ignore[no-untyped-def]
    cached, uncached = os.urandom(2 * MIB), os.urandom(MIB)
    d_cached, d_uncached = put_object(store, cached), put_object(store, uncached)
    origin = start_store_http(store.url)
    cache = start_cache(origin.url, tmp_path / "cachedir")
    status, _, body = http_get(f"{cache.url}/v1/objects/{d_cached}")
    assert status == 200 and body == cached
    origin.stop()  # the blob store goes down

    status, headers, body = http_get(f"{cache.url}/v1/objects/{d_cached}")
    assert status == 200 and body == cached and headers["X-Bdn-Cache"] == "hit"
    status, _, body = http_get(f"{cache.url}/v1/objects/{d_cached}", {"Range": "bytes=-10"})
    assert status == 206 and body == cached[-10:]
    status, headers, body = http_get(f"{cache.url}/v1/objects/{d_uncached}")
    assert status in (502, 503)
    assert b"blob store" in body and b"unavailable" in body and str(d_uncached).encode() in body
    assert headers.get("Retry-After")
    assert metrics(cache.url)['bdn_cache_fill_failures_total{reason="store"}'] >= 1
    assert cached_files(tmp_path / "cachedir").keys() == {d_cached.hex}


async def test_corrupt_store_object_is_rejected_and_not_cached(
        tmp_path: Path, store: BlobStore, start_cache: StartCache) -> None:
    good = os.urandom(3 * MIB)
    digest = Digest.of(good)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    path = Path(store.url) / object_key(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(bad))
    cache = start_cache(store.url)
    url = f"{cache.url}/v1/objects/{digest}"
    async with aiohttp.ClientSession() as session:
        for attempt in (1, 2):
            full = await fetch(session, url)
            ranged = await fetch(session, url, {"Range": "bytes=0-99"})
            for kind, status, _ in (full, ranged):
                # Either refused before the headers (502) or the transfer breaks; never
                # a clean 200/206 of bad bytes.
                assert kind == "broken" or status == 502, (attempt, kind, status)
            assert cached_files(tmp_path / "cache0") == {}
    m = metrics(cache.url)
    assert m['bdn_cache_fill_failures_total{reason="integrity"}'] >= 2
    assert m["bdn_cache_objects"] == 0 and m["bdn_cache_disk_reserved_bytes"] == 0
    assert http_get(url)[0] in (502, BROKEN)
    path.write_bytes(good)  # the store is repaired: the next read fills and verifies
    status, _, body = http_get(url)
    assert status == 200 and body == good


async def test_client_streamed_from_a_corrupt_fill_sees_the_transfer_fail(
        tmp_path: Path, store: BlobStore, start_cache: StartCache,
        start_store_http) -> None:  # type: ignore[no-untyped-def]
    good = os.urandom(12 * MIB)
    digest = Digest.of(good)
    path = Path(store.url) / object_key(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # the very last byte is wrong
    origin = start_store_http(store.url, stall_after=9 * MIB, gated=True)
    cache_dir = tmp_path / "cachedir"
    cache = start_cache(origin.url, cache_dir)
    received = 0
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cache.url}/v1/objects/{digest}") as resp:
            assert resp.status == 200  # headers went out while the fill was running
            received += len(await resp.content.readexactly(MIB))
            assert post_json(f"{origin.url}/_gate/open")[0] == 200  # the rest, bad byte too
            with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
                async for block in resp.content.iter_chunked(MIB):
                    received += len(block)
    assert received < len(good)  # never a complete body
    assert cached_files(cache_dir) == {}
    m = metrics(cache.url)
    assert m['bdn_cache_fill_failures_total{reason="integrity"}'] == 1
    assert m["bdn_cache_objects"] == 0


async def test_kill9_during_fill_never_serves_the_partial(
        tmp_path: Path, store: BlobStore, start_cache: StartCache,
        start_store_http) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(12 * MIB)
    digest = put_object(store, data)
    origin = start_store_http(store.url, stall_after=9 * MIB)  # the fill stalls mid-way
    cache_dir = tmp_path / "cachedir"
    cache = start_cache(origin.url, cache_dir)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cache.url}/v1/objects/{digest}") as resp:
            assert resp.status == 200
            first = await resp.content.readexactly(MIB)  # streamed before the fill ends
            assert first == data[:MIB]
            partial = list((cache_dir / "partial").iterdir())
            assert len(partial) == 1 and partial[0].stat().st_size > 0
            assert metrics(cache.url)["bdn_cache_fills_in_flight"] == 1  # not done yet
            cache.kill9()
    # Restart with the store down: the partial must not be served as complete.
    dead = f"http://127.0.0.1:{free_port()}"
    again = start_cache(dead, cache_dir)
    status, _, body = http_get(f"{again.url}/v1/objects/{digest}")
    assert status == 503, (status, body[:200])
    status, _, _ = http_get(f"{again.url}/v1/objects/{digest}", {"Range": "bytes=0-0"})
    assert status == 503
    assert cached_files(cache_dir) == {}
    again.stop()
    # And with the store back, the object is filled afresh and whole.
    third = start_cache(store.url, cache_dir)
    status, _, body = http_get(f"{third.url}/v1/objects/{digest}")
    assert status == 200 and Digest.of(body) == digest


def test_verify_drops_a_bad_cached_copy(tmp_path: Path, store: BlobStore,
                                        start_cache: StartCache) -> None:
    data = os.urandom(MIB)
    digest = put_object(store, data)
    cache = start_cache(store.url, verify_interval=0)  # verified twice in a row here
    verify = f"{cache.url}/v1/objects/{digest}/verify"
    assert post_json(verify)[1]["status"] == "absent"
    assert http_get(f"{cache.url}/v1/objects/{digest}")[2] == data
    assert post_json(verify) == (200, {"digest": str(digest), "status": "ok"})
    on_disk = tmp_path / "cache0" / "objects" / digest.hex[:2] / digest.hex[2:4] / digest.hex
    with open(on_disk, "r+b") as f:  # bit rot on the cache's disk
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    status, body = post_json(verify)
    assert status == 200 and body["status"] == "dropped"
    assert not on_disk.exists()
    status, headers, got = http_get(f"{cache.url}/v1/objects/{digest}")
    assert status == 200 and got == data and headers["X-Bdn-Cache"] == "miss"
    m = metrics(cache.url)
    assert m["bdn_cache_store_object_reads_total"] == 2 and m["bdn_cache_invalidations_total"] == 1


async def test_randomised_eviction_stays_within_budget(tmp_path: Path, store: BlobStore,
                                                       start_cache: StartCache) -> None:
    rng = random.Random(4)
    budget = 3 * MIB
    objs = {}
    for _ in range(30):
        data = rng.randbytes(rng.randint(1, 700 * 1024))
        objs[put_object(store, data)] = data
    cache = start_cache(store.url, budget=budget)
    digests = list(objs)
    peak = 0

    async def one(session: aiohttp.ClientSession, r: random.Random) -> None:
        d = r.choice(digests[: r.choice([8, 30])])  # a hot set and a long tail
        data = objs[d]
        a = r.randrange(len(data))
        b = r.randrange(a, len(data))
        headers = {"Range": f"bytes={a}-{b}"} if r.random() < 0.5 else {}
        async with session.get(f"{cache.url}/v1/objects/{d}", headers=headers) as resp:
            body = await resp.read()
            assert body == (data[a:b + 1] if headers else data)
        # While other requests are in flight: the server's own (atomic) account.
        async with session.get(f"{cache.url}/metrics") as resp:
            m = parse_metrics(await resp.text())
        assert m["bdn_cache_disk_used_bytes"] + m["bdn_cache_disk_reserved_bytes"] <= budget

    async with aiohttp.ClientSession() as session:
        for _ in range(40):  # rounds of 4 concurrent requests
            await asyncio.gather(*(one(session, rng) for _ in range(4)))
            # Between rounds nothing is in flight: the files on disk themselves.
            used = sum(cached_files(tmp_path / "cache0").values())
            peak = max(peak, used)
            assert used <= budget
    m = metrics(cache.url)
    assert m["bdn_cache_evictions_total"] > 0
    assert peak > budget // 2  # the budget was actually used, not trivially respected


def test_object_being_read_is_not_evicted_under_its_reader(tmp_path: Path, store: BlobStore,
                                                           start_cache: StartCache) -> None:
    big = os.urandom(32 * MIB)
    d_big = put_object(store, big)
    others = [os.urandom(8 * MIB) for _ in range(4)]
    d_others = [put_object(store, o) for o in others]
    cache = start_cache(store.url, budget=48 * MIB)
    cache_dir = tmp_path / "cache0"
    assert http_get(f"{cache.url}/v1/objects/{d_big}")[0] == 200  # cached, and LRU-oldest

    # A slow reader: a small receive buffer, and it stops reading after 64 KiB.
    sock, got = slow_reader(cache.url, f"/v1/objects/{d_big}", 64 * 1024)
    try:
        for d, data in zip(d_others, others, strict=True):  # each needs room: evictions
            assert http_get(f"{cache.url}/v1/objects/{d}")[2] == data
            assert sum(cached_files(cache_dir).values()) <= 48 * MIB
        assert (cache_dir / "objects" / d_big.hex[:2] / d_big.hex[2:4] / d_big.hex).exists()
        assert metrics(cache.url)["bdn_cache_evictions_total"] >= 1
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MIB)
        while True:  # drain the rest of the response
            block = sock.recv(4 * MIB)
            if not block:
                break
            got += block
            head, _, body = bytes(got).partition(b"\r\n\r\n")
            if len(body) >= len(big):
                break
        sock.close()
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == big
    # Unpinned now, and least recently used: the next fill that needs room evicts it.
    extra = os.urandom(8 * MIB)
    assert http_get(f"{cache.url}/v1/objects/{put_object(store, extra)}")[2] == extra
    assert not (cache_dir / "objects" / d_big.hex[:2] / d_big.hex[2:4] / d_big.hex).exists()


def make_model(store: BlobStore, n: int, size: int) -> tuple[Digest, list[bytes]]:
    chunks, datas, off = [], [], 0
    for _ in range(n):
        data = os.urandom(size)
        datas.append(data)
        chunks.append(Chunk(put_object(store, data), off, size))
        off += size
    entry = FileEntry.from_chunks("model.safetensors", chunks)
    manifest = build_manifest([entry], {"uri": "test://model"})
    mdigest = store.put_manifest(manifest)
    store.set_ref(Ref.parse("ns/model:v1"), mdigest)
    return mdigest, datas


def test_manifests_refs_and_prefetch(store: BlobStore, start_cache: StartCache) -> None:
    mdigest, datas = make_model(store, 5, 200 * 1024)
    cache = start_cache(store.url)
    status, headers, body = http_get(f"{cache.url}/v1/manifests/{mdigest}")
    assert status == 200 and Digest.of(body) == mdigest
    assert headers["Content-Type"].startswith("application/json")
    status, _, body = http_get(f"{cache.url}/v1/refs/ns/model/v1")
    assert status == 200 and str(mdigest).encode() in body
    assert http_get(f"{cache.url}/v1/refs/ns/model/nope")[0] == 404

    status, body = post_json(f"{cache.url}/v1/prefetch", {"ref": "ns/model:v1"})
    assert status == 202 and body["queued"] == 5 and body["objects"] == 5
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait for the condition (each probe a round trip)
        m = metrics(cache.url)
        if m["bdn_cache_prefetch_pending"] == 0:
            break
    assert m["bdn_cache_prefetch_filled_total"] == 5
    reads = m["bdn_cache_store_object_reads_total"]
    for data in datas:
        status, headers, body = http_get(f"{cache.url}/v1/objects/{Digest.of(data)}")
        assert status == 200 and body == data and headers["X-Bdn-Cache"] == "hit"
    assert metrics(cache.url)["bdn_cache_store_object_reads_total"] == reads
    # Prefetching again queues nothing; bad requests are refused clearly.
    assert post_json(f"{cache.url}/v1/prefetch", {"manifest": str(mdigest)})[1]["queued"] == 0
    status, body = post_json(f"{cache.url}/v1/prefetch", {"nothing": 1})
    assert status == 400 and "manifest" in str(body["error"])


@pytest.mark.timeout(60)
async def test_foreground_read_is_not_slowed_by_a_throttled_prefetch(
        store: BlobStore, start_cache: StartCache) -> None:
    # At 64 KiB/s the prefetch alone would take over a minute: the test's timeout. A
    # foreground read of the same object lifts the throttle; one of another object
    # does not wait for it at all.
    mdigest, datas = make_model(store, 1, 4 * MIB)
    other = os.urandom(4 * MIB)
    d_other = put_object(store, other)
    cache = start_cache(store.url, prefetch_rate=64 * 1024)
    status, body = post_json(f"{cache.url}/v1/prefetch", {"manifest": str(mdigest)})
    assert status == 202 and body["queued"] == 1
    async with aiohttp.ClientSession() as session:
        r_other, r_same = await asyncio.gather(
            fetch(session, f"{cache.url}/v1/objects/{d_other}"),
            fetch(session, f"{cache.url}/v1/objects/{Digest.of(datas[0])}"))
    assert r_other == ("ok", 200, d_other)
    assert r_same == ("ok", 200, Digest.of(datas[0]))


def test_healthz_metrics_and_bad_requests(store: BlobStore, start_cache: StartCache) -> None:
    cache = start_cache(store.url)
    status, _, body = http_get(f"{cache.url}/healthz")
    assert status == 200 and b'"ok": true' in body
    assert http_get(f"{cache.url}/v1/objects/b3:nothex")[0] == 400
    missing = Digest.of(b"never stored")
    status, _, body = http_get(f"{cache.url}/v1/objects/{missing}")
    assert status == 404 and str(missing).encode() in body
    m = metrics(cache.url)
    assert m["bdn_cache_misses_total"] == 1 and m["bdn_cache_objects"] == 0
    assert 'bdn_cache_fill_seconds_bucket{le="+Inf"}' in m


def test_sigterm_stops_promptly_with_a_stalled_reader(store: BlobStore,
                                                      start_cache: StartCache) -> None:
    data = os.urandom(32 * MIB)
    digest = put_object(store, data)
    cache = start_cache(store.url)
    assert http_get(f"{cache.url}/v1/objects/{digest}")[0] == 200
    u = urllib.parse.urlsplit(cache.url)
    with socket.create_connection((u.hostname, u.port)) as sock:
        sock.sendall(f"GET /v1/objects/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # then it reads no more
        # Graceful stop must not wait on a client that stopped reading (aiohttp alone
        # would wait its 10 s shutdown timeout, then longer for the send thread).
        assert cache.stop(timeout_s=8) == 0


def test_http_store_down_is_an_error_not_a_missing_object(
        tmp_path: Path, store: BlobStore, start_store_http) -> None:  # type: ignore[no-untyped-def]
    """fsspec's HTTP filesystem says FileNotFoundError for any failure; the backend
    tells "no such object" (404) from "store unreachable" (any other failure)."""
    data = os.urandom(1000)
    digest = put_object(store, data)
    origin = start_store_http(store.url)
    backend = FsspecBackend(origin.url)
    assert backend.size(object_key(digest)) == len(data)
    assert backend.size(object_key(Digest.of(b"absent"))) is None
    origin.stop()
    with pytest.raises(StoreError) as e:
        backend.size(object_key(digest))
    assert origin.url in str(e.value) and "unreachable" in str(e.value)


def test_cached_file_gone_from_disk_is_503_then_filled_again(
        tmp_path: Path, store: BlobStore, start_cache: StartCache) -> None:
    data = os.urandom(100_000)
    digest = put_object(store, data)
    cache = start_cache(store.url, tmp_path / "cachedir")
    assert http_get(f"{cache.url}/v1/objects/{digest}")[0] == 200
    (path,) = (p for p in (tmp_path / "cachedir" / "objects").rglob("*") if p.is_file())
    path.unlink()  # an operator's rm, a disk error: the index still lists it
    status, headers, body = http_get(f"{cache.url}/v1/objects/{digest}")
    assert status == 503 and headers.get("Retry-After") and b"vanished" in body
    status, headers, body = http_get(f"{cache.url}/v1/objects/{digest}")
    assert (status, body, headers["X-Bdn-Cache"]) == (200, data, "miss")


async def test_only_if_cached_never_fills(
        tmp_path: Path, store: BlobStore, start_cache: StartCache,
        start_store_http) -> None:  # type: ignore[no-untyped-def]
    """``Cache-Control: only-if-cached`` (RFC 9111 §5.2.1.7), as agents send on a hedge
    or a second ask to a pod that does not own the object: a miss is answered 504 and
    reads nothing from the store; a fill in flight is joined (it costs no store read);
    a cached object is served as always."""
    data = os.urandom(2 * MIB)
    digest = put_object(store, data)
    # Every object response of the store stops after 1 MiB until the gate opens.
    origin = start_store_http(store.url, stall_after=MIB, gated=True)
    cache = start_cache(origin.url, tmp_path / "cachedir")
    url = f"{cache.url}/v1/objects/{digest}"
    only = {"Cache-Control": "only-if-cached"}
    for method in ("GET", "HEAD"):
        status, headers, body = http_get(url, only, method)
        assert status == 504, (method, status, body)
        if method == "GET":
            assert b"only-if-cached" in body and str(digest).encode() in body
    m = metrics(cache.url)
    assert m["bdn_cache_store_object_reads_total"] == 0
    assert m["bdn_cache_misses_total"] == 0

    async def now(name: str) -> float:
        return (await asyncio.to_thread(metrics, cache.url))[name]  # a round trip each

    async with aiohttp.ClientSession() as session:
        filler = asyncio.create_task(fetch(session, url))
        deadline = time.monotonic() + 30
        while await now("bdn_cache_fills_in_flight") < 1:
            assert time.monotonic() < deadline, "the fill did not start"
        joined = asyncio.create_task(fetch(session, url, only))
        while await now("bdn_cache_coalesced_waiters_total") < 1:
            assert time.monotonic() < deadline, "only-if-cached did not join the fill"
        assert (await asyncio.to_thread(post_json, f"{origin.url}/_gate/open"))[0] == 200
        assert [await filler, await joined] == [("ok", 200, digest)] * 2
    status, headers, body = http_get(url, only)
    assert status == 200 and body == data and headers["X-Bdn-Cache"] == "hit"
    m = metrics(cache.url)
    assert m["bdn_cache_store_object_reads_total"] == 1
