"""A cache pod reads exactly the bytes of an object from a remote store, no read-ahead.

Each store kind a pod can sit on (an ``http://`` store, S3 on moto, GCS on
fake-gcs-server) is reached through ``count_proxy.py``, which counts the body bytes the
store really sent, outside bdn and independent of its metrics. Objects of awkward sizes
(one byte, 1 MiB, sizes that are no multiple of any block size, one larger than a read
range) are read through a real ``bdn cache-server`` with ranges (the tail first, so a
range starts the fill), whole, and again in the middle; the store must have sent no
more than 1.01 × the bytes of the objects. The S3 and GCS pods reach the store only by
``--store-endpoint-url``, the flag ``bdn mirror`` takes.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bdn.store import BlobStore, StoreOptions
from manifests.digest import Digest
from manifests.manifest import ENCODING_ZSTD
from tests.support.buckets import SAFE_ENV
from tests.support.cache import StartCache, put_object
from tests.support.http import http_get
from tests.support.procs import ServiceProcess

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
COUNT_PROXY = str(Path(__file__).with_name("count_proxy.py"))
STATS_PATH = "/_count/stats"
# Random (incompressible, so stored raw) objects: tiny, a power of two, and sizes that
# are no multiple of any block or range size, one past fsspec's 5 MiB HTTP block and
# the store's read range.
RAW_SIZES = (1, 1000, MIB, MIB + 12_345, 13 * MIB + 7)
# A compressible object, stored zstd-encoded: its frame is read, not its decoded size.
ZSTD_BYTES = 3 * MIB + 5
# A zstd object's decoded size is peeked from its frame header before the fill
# (cache.fills.ZSTD_HEADER_PEEK_BYTES): a read of the store, but of a few bytes.
ZSTD_PEEK_BYTES = 18
MAX_OVERREAD = 1.01


@pytest.fixture(autouse=True)
def _loopback_only_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cache pods inherit it: S3 credentials for moto, no GCE metadata lookups.
    for k, v in SAFE_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def start_count_proxy(procs: list[ServiceProcess]) -> Callable[[str], ServiceProcess]:
    def start(upstream: str) -> ServiceProcess:
        p = ServiceProcess([sys.executable, COUNT_PROXY, upstream, "--listen",
                            "127.0.0.1:0"], env={"PYTHONPATH": os.getcwd()})
        procs.append(p)
        return p

    return start


class Remote:
    """A store of one kind behind a counting proxy: where to put objects, and the
    ``cache-server`` flags that reach it through the proxy."""

    def __init__(self, store: BlobStore, cache_store: str, proxy: ServiceProcess,
                 endpoint_flag: bool) -> None:
        self.store = store
        self.cache_store = cache_store
        self.proxy = proxy
        self.endpoint_flag = endpoint_flag

    def cache_opts(self) -> dict[str, Any]:
        return {"store_endpoint_url": self.proxy.url} if self.endpoint_flag else {}

    def log(self) -> list[list[Any]]:
        status, _, body = http_get(f"{self.proxy.url}{STATS_PATH}")
        assert status == 200
        return list(json.loads(body)["requests"])


@pytest.fixture(params=["http", "s3", "gs"])
def remote(request: pytest.FixtureRequest, tmp_path: Path, start_store_http: Any,
           start_count_proxy: Callable[[str], ServiceProcess]) -> Iterator[Remote]:
    kind = request.param
    if kind == "http":
        store = BlobStore(str(tmp_path / "store"))
        proxy = start_count_proxy(start_store_http(store.url).url)
        yield Remote(store, proxy.url, proxy, endpoint_flag=False)
        return
    server = request.getfixturevalue("s3_server" if kind == "s3" else "gcs_server")
    bucket = server.bucket("ranges")
    url = f"{kind}://{bucket}/store"
    store = BlobStore(url, StoreOptions(storage_options=server.storage_options()))
    yield Remote(store, url, start_count_proxy(server.url), endpoint_flag=True)


def _object_reads(log: list[list[Any]], digest: Digest) -> int:
    """Body bytes of the store's answers that carried the object's content: GETs of its
    key, answered 200 or 206. Error bodies, listings (the key in a query) and GCS's JSON
    metadata (under ``/storage/v1/``) are not content."""
    return sum(int(n) for method, path, _rng, status, n in log
               if method == "GET" and status in (200, 206)
               and digest.hex in path.partition("?")[0]
               and not path.startswith("/storage/v1/"))


def _read_through(cache_url: str, digest: Digest, data: bytes) -> None:
    """Tail range first (it starts the fill), the whole object, then a middle range."""
    url = f"{cache_url}/v1/objects/{digest}"
    n = len(data)
    tail = min(n, 1000)
    status, _, body = http_get(url, {"Range": f"bytes=-{tail}"})
    assert (status, body) == (206, data[n - tail:]), f"tail of {n} bytes: {status}"
    status, _, body = http_get(url)
    assert status == 200 and body == data, f"whole object of {n} bytes: {status}"
    a, b = n // 3, max(n // 3, 2 * n // 3 - 1)
    status, _, body = http_get(url, {"Range": f"bytes={a}-{b}"})
    assert (status, body) == (206, data[a:b + 1]), f"middle of {n} bytes: {status}"


def test_cache_pod_reads_exact_ranges_from_a_remote_store(
        remote: Remote, start_cache: StartCache) -> None:
    blobs = [os.urandom(n) for n in RAW_SIZES]
    digests = [put_object(remote.store, b) for b in blobs]
    zeros = bytes(ZSTD_BYTES)
    zdigest = put_object(remote.store, zeros)
    zinfo = remote.store.stat_object(zdigest)
    assert zinfo is not None and zinfo.encoding == ENCODING_ZSTD
    cache = start_cache(remote.cache_store, **remote.cache_opts())
    for digest, data in zip(digests, blobs, strict=True):
        _read_through(cache.url, digest, data)
    _read_through(cache.url, zdigest, zeros)

    log = remote.log()
    served = sum(RAW_SIZES)
    raw = 0
    for digest, n in zip(digests, RAW_SIZES, strict=True):
        got = _object_reads(log, digest)
        # Every byte once: a short read would have failed verification above.
        assert got <= n * MAX_OVERREAD, (
            f"{got} bytes read from the store for an object of {n}: "
            f"{[r for r in log if digest.hex in r[1]]}")
        raw += got
    assert raw <= served * MAX_OVERREAD
    zraw = _object_reads(log, zdigest)
    assert zraw <= zinfo.stored_length + ZSTD_PEEK_BYTES, (
        f"{zraw} bytes read for a zstd object stored in {zinfo.stored_length}: "
        f"{[r for r in log if zdigest.hex in r[1]]}")
