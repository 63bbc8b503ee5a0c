"""The HTTP store helper's rate cap (``store_http.py --rate``), which the cold-start
benchmark relies on to stand for a remote store: all responses together stay under the
cap, and the bytes are the store's."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bdn.store import BlobStore, object_key
from manifests.digest import Digest
from tests.support.cache import put_object
from tests.support.http import http_get

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
RATE_BYTES_PER_S = 8 * MIB
OBJECT_BYTES = 4 * MIB
# One block may go out before the cap applies (store_http.SEND_BLOCK_BYTES).
BLOCK_BYTES = 256 * 1024


def _object_url(base: str, digest: Digest) -> str:
    return f"{base}/{object_key(digest)}"


def test_rate_cap_is_shared_by_concurrent_responses(tmp_path: Path,
                                                    start_store_http) -> None:  # type: ignore[no-untyped-def]
    store = BlobStore(str(tmp_path / "store"))
    blobs = [os.urandom(OBJECT_BYTES) for _ in range(2)]
    digests = [put_object(store, b) for b in blobs]
    origin = start_store_http(store.url, rate=RATE_BYTES_PER_S)
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda d: http_get(_object_url(origin.url, d)),
                                digests))
    took = time.monotonic() - t0
    assert [a[0] for a in answers] == [200, 200]
    assert [a[2] for a in answers] == blobs
    # A lower bound only (a loaded machine is slower, never faster): two objects over
    # one shared link, not one link each.
    floor_s = (2 * OBJECT_BYTES - 2 * BLOCK_BYTES) / RATE_BYTES_PER_S
    assert took >= floor_s, f"{2 * OBJECT_BYTES} bytes in {took:.2f} s beat the cap"


def test_rate_cap_applies_to_ranges(tmp_path: Path, start_store_http) -> None:  # type: ignore[no-untyped-def]
    store = BlobStore(str(tmp_path / "store"))
    data = os.urandom(OBJECT_BYTES)
    digest = put_object(store, data)
    origin = start_store_http(store.url, rate=RATE_BYTES_PER_S)
    t0 = time.monotonic()
    status, _, body = http_get(_object_url(origin.url, digest),
                               {"Range": f"bytes={MIB}-{3 * MIB - 1}"})
    took = time.monotonic() - t0
    assert status == 206 and body == data[MIB:3 * MIB]
    assert took >= (2 * MIB - BLOCK_BYTES) / RATE_BYTES_PER_S
