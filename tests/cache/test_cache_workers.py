"""``bdn cache-server --workers N``: several processes on one port, one owner of the folder.

Real servers on loopback. Which process takes a connection is the kernel's choice
(``SO_REUSEPORT``), so tests that need a given process open connections until one lands
there and keep using it (keep-alive); each response names its process in
``X-Bdn-Worker`` (forwarded ones name the worker that took them in ``X-Bdn-Via``).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import select
import signal
import socket
import urllib.parse
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from bdn.store import BlobStore, object_key
from cache.server import CacheServerOptions, parse_metrics
from manifests.digest import Digest, Hasher
from tests.cache.test_cache_ranges import SATISFIABLE, UNSATISFIABLE, N
from tests.support.cache import StartCache, metrics, put_object
from tests.support.http import http_get, post_json, slow_reader

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

MIB = 1024 * 1024
# Each new connection lands on a given one of two processes with probability 1/2.
MAX_CONNECT_TRIES = 200
EXIT_WAIT_S = 30.0


def processes(url: str) -> dict[str, int]:
    """Serving process index → pid, from ``/healthz``."""
    return {k: int(v) for k, v in json.loads(http_get(f"{url}/healthz")[2])["processes"].items()}


def connection_to(url: str, worker: str, path: str,
                  probes: Counter[str]) -> http.client.HTTPConnection:
    """A keep-alive connection that process ``worker`` serves (``path``: a cached object;
    each probe, a HEAD hit, is counted in ``probes`` by the process that answered)."""
    u = urllib.parse.urlsplit(url)
    for _ in range(MAX_CONNECT_TRIES):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        conn.request("HEAD", path)
        resp = conn.getresponse()
        resp.read()
        probes[resp.getheader("X-Bdn-Worker", "")] += 1
        if resp.getheader("X-Bdn-Worker") == worker:
            return conn
        conn.close()
    raise AssertionError(f"no connection to {url} landed on process {worker}")


def wait_exited(pid: int, timeout_s: float = EXIT_WAIT_S) -> bool:
    """Block until process ``pid`` has terminated (pidfd: woken by the exit itself)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(fd)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class HitClient:
    """Requests on one keep-alive connection; asserts every answer is a hit of
    ``worker`` and counts responses and body bytes by process."""

    def __init__(self, conn: http.client.HTTPConnection, worker: str, path: str,
                 served: Counter[str], sent: Counter[str]) -> None:
        self.conn, self.worker, self.path = conn, worker, path
        self.served, self.sent = served, sent

    def __call__(self, headers: dict[str, str], method: str = "GET",
                 ) -> tuple[int, dict[str, str], bytes]:
        self.conn.request(method, self.path, headers=headers)
        r = self.conn.getresponse()
        body = r.read()
        got = dict(r.getheaders())
        assert got["X-Bdn-Worker"] == self.worker and got["X-Bdn-Cache"] == "hit"
        self.served[self.worker] += 1
        self.sent[self.worker] += len(body)
        return r.status, got, body


def test_options_validate_workers() -> None:
    with pytest.raises(ValueError):
        CacheServerOptions(store_url="/s", cache_dir="/x", budget_bytes=1, workers=0)
    assert CacheServerOptions(store_url="/s", cache_dir="/x", budget_bytes=1).workers >= 1


def test_every_process_answers_hits_alike_and_counts_them(store: BlobStore,
                                                           start_cache: StartCache) -> None:
    data = os.urandom(N)
    digest = put_object(store, data)
    cache = start_cache(store.url, workers=2)
    path = f"/v1/objects/{digest}"
    status, headers, _ = http_get(f"{cache.url}{path}")  # the fill: the owner's
    assert status == 200 and headers["X-Bdn-Worker"] == "0"
    assert set(processes(cache.url)) == {"0", "1"}
    served: Counter[str] = Counter()
    sent: Counter[str] = Counter()
    for worker in ("0", "1"):
        conn = connection_to(cache.url, worker, path, served)
        get = HitClient(conn, worker, path, served, sent)
        status, h, body = get({})
        assert status == 200 and Digest.of(body) == digest, worker
        assert h["ETag"] == f'"{digest}"' and h["Content-Length"] == str(N)
        assert h["Cache-Control"].endswith("immutable") and h["Accept-Ranges"] == "bytes"
        for header, sl in SATISFIABLE:
            status, h, body = get({"Range": header})
            s, e = sl.indices(N)[:2]
            assert status == 206 and body == data[sl], (worker, header)
            assert h["Content-Range"] == f"bytes {s}-{e - 1}/{N}"
        for header in UNSATISFIABLE:
            status, h, body = get({"Range": header})
            assert status == 416 and h["Content-Range"] == f"bytes */{N}", (worker, header)
            assert str(digest).encode() in body
            sent[worker] -= len(body)  # an error body, not object bytes
        status, h, body = get({}, method="HEAD")
        assert status == 200 and h["Content-Length"] == str(N) and body == b""
        status, h, body = get({"If-None-Match": f'"{digest}"'})
        assert status == 304 and body == b""
        conn.close()
    m = metrics(cache.url)
    assert m["bdn_cache_store_object_reads_total"] == 1
    for worker in ("0", "1"):
        assert m[f'bdn_cache_process_hits_total{{worker="{worker}"}}'] == served[worker]
        assert m[f'bdn_cache_process_bytes_served_total{{worker="{worker}"}}'] >= sent[worker]
    # Worker 1 serves hits only: its bytes are exactly what its responses carried.
    assert m['bdn_cache_process_bytes_served_total{worker="1"}'] == sent["1"]
    assert m["bdn_cache_hits_total"] == served["0"] + served["1"]
    assert m["bdn_cache_processes"] == 2


async def test_many_connections_are_spread_and_every_body_is_right(
        store: BlobStore, start_cache: StartCache) -> None:
    data = os.urandom(8 * MIB)
    digest = put_object(store, data)
    cache = start_cache(store.url, workers=2)
    url = f"{cache.url}/v1/objects/{digest}"
    assert http_get(url)[0] == 200

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[str, int]:
        a = (i * 700_001) % len(data)
        b = min(len(data), a + (i + 1) * 97_003)
        headers = {"Range": f"bytes={a}-{b - 1}"} if i % 2 else {}
        async with session.get(url, headers=headers) as resp:
            body = await resp.read()
            assert resp.headers["X-Bdn-Cache"] == "hit"
            if headers:
                assert resp.status == 206 and body == data[a:b], i
            else:
                assert resp.status == 200 and Digest.of(body) == digest, i
            return resp.headers["X-Bdn-Worker"], len(body)

    # A new connection per request: the kernel spreads them over the processes.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(one(session, i) for i in range(48)))
    by_worker = Counter(w for w, _ in results)
    assert set(by_worker) == {"0", "1"}, by_worker
    m = metrics(cache.url)
    assert m['bdn_cache_process_hits_total{worker="1"}'] == by_worker["1"]
    assert m['bdn_cache_process_bytes_served_total{worker="1"}'] == sum(
        n for w, n in results if w == "1")
    assert m["bdn_cache_hits_total"] == 48
    assert m["bdn_cache_store_object_reads_total"] == 1


async def test_64_clients_of_an_uncached_object_across_processes_read_the_store_once(
        store: BlobStore, start_cache: StartCache,
        start_store_http) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(16 * MIB)
    digest = put_object(store, data)
    # The store holds every fill after 1 MiB until the gate opens: all 64 requests
    # arrive (directly or forwarded by a worker) while the one fill is in flight.
    origin = start_store_http(store.url, stall_after=MIB, gated=True)
    cache = start_cache(origin.url, workers=2)
    url = f"{cache.url}/v1/objects/{digest}"

    async def fetch(session: aiohttp.ClientSession) -> tuple[int, Digest, str, str]:
        async with session.get(url) as resp:
            h = Hasher()
            async for block in resp.content.iter_chunked(MIB):
                h.update(block)
            return (resp.status, h.digest(), resp.headers["X-Bdn-Cache"],
                    resp.headers.get("X-Bdn-Via", ""))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(fetch(session)) for _ in range(64)]
        while True:  # each probe a round trip; the condition, not a time, ends it
            async with session.get(f"{cache.url}/metrics") as resp:
                m = parse_metrics(await resp.text())
            if m["bdn_cache_misses_total"] + m["bdn_cache_coalesced_waiters_total"] >= 64:
                break
            assert not any(t.done() for t in tasks)
        async with session.post(f"{origin.url}/_gate/open") as resp:
            assert resp.status == 200
        results = await asyncio.gather(*tasks)
    assert all(r[:2] == (200, digest) for r in results), results[:3]
    assert Counter(r[2] for r in results) == {"miss": 1, "coalesced": 63}
    assert {r[3] for r in results} == {"", "1"}  # some came in through the worker
    m = metrics(cache.url)
    assert m["bdn_cache_store_object_reads_total"] == 1
    assert m["bdn_cache_bytes_filled_total"] == 16 * MIB
    assert m["bdn_cache_bytes_served_total"] == 64 * 16 * MIB


def test_a_miss_taken_by_a_worker_is_relayed_from_the_owners_fill(
        store: BlobStore, start_cache: StartCache) -> None:
    probe, data = os.urandom(1024), os.urandom(12 * MIB + 5)
    d_probe, digest = put_object(store, probe), put_object(store, data)
    cache = start_cache(store.url, workers=2)
    assert http_get(f"{cache.url}/v1/objects/{d_probe}")[0] == 200
    conn = connection_to(cache.url, "1", f"/v1/objects/{d_probe}", Counter())
    conn.request("GET", f"/v1/objects/{digest}", headers={"Range": "bytes=100-"})
    r = conn.getresponse()
    assert r.status == 206 and r.getheader("X-Bdn-Via") == "1"
    assert r.getheader("X-Bdn-Cache") == "miss"
    assert r.getheader("Content-Range") == f"bytes 100-{len(data) - 1}/{len(data)}"
    assert r.read() == data[100:]
    conn.request("GET", f"/v1/objects/{digest}")  # the same connection, now a hit here
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("X-Bdn-Worker") == "1" and r.read() == data
    conn.close()
    assert metrics(cache.url)["bdn_cache_store_object_reads_total"] == 2


def test_a_relayed_fill_that_fails_verification_breaks_the_clients_transfer(
        tmp_path: Path, store: BlobStore, start_cache: StartCache,
        start_store_http) -> None:  # type: ignore[no-untyped-def]
    probe, good = os.urandom(1024), os.urandom(12 * MIB)
    d_probe, digest = put_object(store, probe), Digest.of(good)
    bad = Path(store.url) / object_key(digest)
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # the very last byte is wrong
    origin = start_store_http(store.url, stall_after=9 * MIB, gated=True)
    cache_dir = tmp_path / "cachedir"
    cache = start_cache(origin.url, cache_dir, workers=2)
    assert http_get(f"{cache.url}/v1/objects/{d_probe}")[0] == 200
    conn = connection_to(cache.url, "1", f"/v1/objects/{d_probe}", Counter())
    conn.request("GET", f"/v1/objects/{digest}")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("X-Bdn-Via") == "1"  # streamed while filling
    assert r.read(MIB) == good[:MIB]
    assert post_json(f"{origin.url}/_gate/open")[0] == 200  # the rest, bad byte too
    with pytest.raises(http.client.IncompleteRead):
        r.read()
    conn.close()
    objects = cache_dir / "objects"
    assert not (objects / digest.hex[:2] / digest.hex[2:4] / digest.hex).exists()
    assert not any((cache_dir / "partial").iterdir())
    assert metrics(cache.url)['bdn_cache_fill_failures_total{reason="integrity"}'] == 1


def test_killing_the_owner_leaves_no_worker(store: BlobStore,
                                           start_cache: StartCache) -> None:
    cache = start_cache(store.url, workers=3)
    pids = processes(cache.url)
    assert set(pids) == {"0", "1", "2"} and pids["0"] == cache.pid
    os.kill(cache.pid, signal.SIGKILL)  # the owner only, by PID
    assert cache.proc.wait(EXIT_WAIT_S) == -signal.SIGKILL
    for worker in ("1", "2"):
        assert wait_exited(pids[worker]), f"worker {worker} outlived the owner"
        assert not running(pids[worker])


def test_sigterm_to_the_owner_stops_its_workers(store: BlobStore,
                                               start_cache: StartCache) -> None:
    data = os.urandom(MIB)
    digest = put_object(store, data)
    cache = start_cache(store.url, workers=2)
    assert http_get(f"{cache.url}/v1/objects/{digest}")[2] == data
    pids = processes(cache.url)
    os.kill(cache.pid, signal.SIGTERM)  # the owner only: it passes the stop on
    assert cache.proc.wait(EXIT_WAIT_S) == 0
    assert wait_exited(pids["1"]) and not running(pids["1"])


def stalled_reader(url: str, path: str, read_bytes: int = 0) -> tuple[socket.socket, str]:
    """A connection that asked for ``path`` (a cached object), read the headers (and
    ``read_bytes``) and then nothing more; and the process serving it."""
    sock, got = slow_reader(url, path, read_bytes)
    head = got.partition(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    worker = head.partition("X-Bdn-Worker: ")[2].partition("\r\n")[0]
    return sock, worker


def test_sigterm_stops_every_process_promptly_with_stalled_readers(
        store: BlobStore, start_cache: StartCache) -> None:
    data = os.urandom(32 * MIB)
    digest = put_object(store, data)
    cache = start_cache(store.url, workers=2, send_threads=0)  # sent from the loops
    path = f"/v1/objects/{digest}"
    assert http_get(f"{cache.url}{path}")[0] == 200
    pids = processes(cache.url)
    readers: dict[str, socket.socket] = {}
    try:
        for _ in range(MAX_CONNECT_TRIES):  # a stalled reader on each process
            sock, worker = stalled_reader(cache.url, path)
            if worker in readers:
                sock.close()
            else:
                readers[worker] = sock
            if len(readers) == 2:
                break
        assert set(readers) == {"0", "1"}
        # Graceful stop (SIGTERM to the owner only: it passes it on) must not wait on
        # clients that stopped reading (aiohttp alone would wait its 10 s timeout).
        os.kill(cache.pid, signal.SIGTERM)
        assert cache.proc.wait(8) == 0
        assert wait_exited(pids["1"]) and not running(pids["1"])
    finally:
        for sock in readers.values():
            sock.close()


def test_a_worker_pins_what_it_sends_and_a_dead_workers_pins_are_released(
        tmp_path: Path, store: BlobStore, start_cache: StartCache) -> None:
    big = os.urandom(32 * MIB)
    d_big = put_object(store, big)
    others = [os.urandom(8 * MIB) for _ in range(4)]
    d_others = [put_object(store, o) for o in others]
    cache = start_cache(store.url, budget=48 * MIB, workers=2)
    on_disk = tmp_path / "cache0" / "objects" / d_big.hex[:2] / d_big.hex[2:4] / d_big.hex
    path = f"/v1/objects/{d_big}"
    assert http_get(f"{cache.url}{path}")[0] == 200  # cached, and LRU-oldest
    worker_pid = processes(cache.url)["1"]

    # A slow reader on worker 1: a small receive buffer, and it stops after 64 KiB.
    for _ in range(MAX_CONNECT_TRIES):
        sock, worker = stalled_reader(cache.url, path, 64 * 1024)
        if worker == "1":
            break
        sock.close()
    else:
        raise AssertionError("no connection landed on worker 1")
    try:
        for d, data in zip(d_others[:3], others[:3], strict=True):  # each needs room
            assert http_get(f"{cache.url}/v1/objects/{d}")[2] == data
        assert on_disk.exists()  # pinned by the worker that is sending it
        assert metrics(cache.url)["bdn_cache_evictions_total"] >= 1
        os.kill(worker_pid, signal.SIGKILL)  # the worker dies mid-send
        assert wait_exited(worker_pid)
        line = cache.wait_line("in place of the one that exited")
        assert "cache worker 1" in line
    finally:
        sock.close()
    assert processes(cache.url)["1"] != worker_pid
    # The dead worker's pin went with it: the next fill that needs room evicts the
    # least recently used object, the big one.
    assert http_get(f"{cache.url}/v1/objects/{d_others[3]}")[2] == others[3]
    assert not on_disk.exists()
