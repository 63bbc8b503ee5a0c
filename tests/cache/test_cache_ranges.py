"""Byte ranges: every boundary case equals slicing, on a miss (streamed from the fill)
and on a hit (sendfile); 416 with ``Content-Range: bytes */size`` where due."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bdn.store import BlobStore
from cache.errors import RangeNotSatisfiableError
from cache.server import parse_range
from tests.support.cache import StartCache, put_object
from tests.support.http import http_get

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

N = 3 * 1024 * 1024 + 17  # several fill blocks, not block aligned

# (Range header, expected slice) — every boundary the issue names, and then some.
SATISFIABLE = [
    ("bytes=0-0", slice(0, 1)),                 # first byte
    (f"bytes={N - 1}-{N - 1}", slice(N - 1, N)),  # last byte
    (f"bytes={N - 1}-", slice(N - 1, N)),       # open range at the last byte
    ("bytes=-1", slice(N - 1, N)),              # suffix of one
    ("bytes=-1000", slice(N - 1000, N)),        # suffix
    (f"bytes=-{N}", slice(0, N)),               # suffix of everything
    (f"bytes=-{N + 5000}", slice(0, N)),        # suffix longer than the object
    ("bytes=12345-", slice(12345, N)),          # open-ended
    (f"bytes=10-{N + 999}", slice(10, N)),      # last byte past the end: clamped
    (f"bytes=0-{N - 1}", slice(0, N)),          # the whole object, still 206
    ("bytes=1048575-1048576", slice(1048575, 1048577)),  # across a fill block boundary
]
UNSATISFIABLE = [f"bytes={N}-", f"bytes={N}-{N + 10}", f"bytes={N + 100}-", "bytes=-0",
                 "bytes=5-3", "bytes=a-b"]


@pytest.fixture
def objects(store: BlobStore) -> list[tuple[str, bytes]]:
    out = []
    for _ in range(len(SATISFIABLE) + len(UNSATISFIABLE)):
        data = os.urandom(N)
        out.append((str(put_object(store, data)), data))
    return out


def test_every_range_equals_slicing_on_miss_and_hit(store: BlobStore, start_cache: StartCache,
                                                    objects: list[tuple[str, bytes]]) -> None:
    cache = start_cache(store.url)
    for phase in ("miss", "hit"):
        # Each case gets its own object, so on the first pass each is served from a fill.
        for (header, sl), (digest, data) in zip(SATISFIABLE, objects, strict=False):
            status, headers, body = http_get(f"{cache.url}/v1/objects/{digest}",
                                             {"Range": header})
            assert status == 206, (phase, header, body[:200])
            assert headers["X-Bdn-Cache"] in (phase, "coalesced")
            assert body == data[sl], (phase, header)
            s, e = sl.indices(N)[:2]
            assert headers["Content-Range"] == f"bytes {s}-{e - 1}/{N}"
            assert int(headers["Content-Length"]) == e - s
            assert headers["ETag"] == f'"{digest}"'
            assert "immutable" in headers["Cache-Control"]
        for header, (digest, _) in zip(UNSATISFIABLE, objects[len(SATISFIABLE):],
                                       strict=False):
            status, headers, body = http_get(f"{cache.url}/v1/objects/{digest}",
                                             {"Range": header})
            assert status == 416, (phase, header)
            assert headers["Content-Range"] == f"bytes */{N}"
            assert digest.encode() in body
    # The whole object without Range, several ranges (answered whole), and HEAD.
    digest, data = objects[0]
    status, headers, body = http_get(f"{cache.url}/v1/objects/{digest}")
    assert status == 200 and body == data and headers["Accept-Ranges"] == "bytes"
    status, _, body = http_get(f"{cache.url}/v1/objects/{digest}", {"Range": "bytes=0-1,5-6"})
    assert status == 200 and body == data
    status, headers, body = http_get(f"{cache.url}/v1/objects/{digest}", method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == N


def test_empty_object(store: BlobStore, start_cache: StartCache) -> None:
    digest = str(put_object(store, b""))
    cache = start_cache(store.url)
    for _ in ("miss", "hit"):
        status, headers, body = http_get(f"{cache.url}/v1/objects/{digest}")
        assert (status, body, headers["Content-Length"]) == (200, b"", "0")
        status, headers, _ = http_get(f"{cache.url}/v1/objects/{digest}",
                                      {"Range": "bytes=0-"})
        assert status == 416 and headers["Content-Range"] == "bytes */0"


@given(st.integers(0, 50), st.one_of(st.none(), st.integers(0, 60)),
       st.one_of(st.none(), st.integers(0, 60)))
def test_parse_range_matches_slicing(size: int, first: int | None, last: int | None) -> None:
    data = bytes(range(size))
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    try:
        got = parse_range(header, size)
    except RangeNotSatisfiableError:
        got = None
        if first is None:
            assert last is None or last == 0 or size == 0
        else:
            assert first >= size or (last is not None and last < first)
        return
    assert got is not None
    start, end = got
    if first is None:
        assert last is not None
        assert data[start:end] == data[-last:]
    else:
        stop = size if last is None else last + 1
        assert data[start:end] == data[first:stop]
    assert 0 <= start < end <= size


def test_parse_range_ignores_what_it_may() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("items=0-1", 10) is None
    assert parse_range("bytes=0-1,4-5", 10) is None
