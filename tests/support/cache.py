"""Helpers of the cluster cache tests (the fixtures that use them are in
tests/cache/conftest.py): objects put into a store, a cache pod's metrics, and the
signature of the ``start_cache`` fixture."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bdn.store import BlobStore
from cache.server import parse_metrics
from manifests.digest import Digest
from tests.support.http import http_get
from tests.support.procs import ServiceProcess

# A stand-in blob store served over HTTP, for fills that stall or wait on a gate.
STORE_HTTP = str(Path(__file__).parents[1] / "cache" / "store_http.py")

StartCache = Callable[..., ServiceProcess]


def put_object(store: BlobStore, data: bytes) -> Digest:
    d = Digest.of(data)
    store.put_chunk(d, data)
    return d


def metrics(url: str) -> dict[str, float]:
    return parse_metrics(http_get(f"{url}/metrics")[2].decode())
