"""The exact-range reader of remote stores (:class:`bdn.store.RangeReader`): ranges that
tile the object exactly, whatever the callers' read sizes; a store that ignores
``Range`` tolerated; a wrong length an error naming the offset. End to end through real
stores and a cache pod: tests/cache/test_cache_store_ranges.py."""

from __future__ import annotations

import os
import uuid

import pytest

from bdn.errors import NotFoundError, StoreError
from bdn.store import RANGE_SIZE_BYTES, BlobStore, RangeReader, object_key
from manifests.digest import Digest


class Fetches:
    """The remote end: an object's bytes, answering ranged GETs and recording them."""

    def __init__(self, data: bytes, *, ignore_range: bool = False) -> None:
        self.data = data
        self.ignore_range = ignore_range
        self.asked: list[tuple[int, int]] = []

    def __call__(self, start: int, end: int) -> bytes:
        self.asked.append((start, end))
        return self.data if self.ignore_range else self.data[start:end]


@pytest.mark.parametrize("size", [0, 1, 999, 4096, 10_000, 10_007])
@pytest.mark.parametrize("read_bytes", [1, 333, 1024, 100_000])
def test_ranges_tile_the_object_exactly(size: int, read_bytes: int) -> None:
    data = os.urandom(size)
    fetch = Fetches(data)
    with RangeReader(fetch, size, range_bytes=1024) as f:
        got = b"".join(iter(lambda: f.read(read_bytes), b""))
    assert got == data
    assert fetch.asked == [(a, min(size, a + 1024)) for a in range(0, size, 1024)]


def test_readinto_and_readall() -> None:
    data = os.urandom(5000)
    fetch = Fetches(data)
    buf = bytearray(5000)
    with RangeReader(fetch, len(data), range_bytes=2048) as f:
        got = 0
        while n := f.readinto(memoryview(buf)[got:]):
            got += n
    assert bytes(buf) == data and sum(b - a for a, b in fetch.asked) == len(data)
    with RangeReader(Fetches(data), len(data), range_bytes=2048) as f:
        assert f.read() == data


def test_a_store_that_ignores_range_is_read_once() -> None:
    data = os.urandom(5000)
    fetch = Fetches(data, ignore_range=True)
    with RangeReader(fetch, len(data), range_bytes=1024) as f:
        assert b"".join(iter(lambda: f.read(700), b"")) == data
    assert fetch.asked == [(0, 1024)]


def test_a_wrong_length_names_the_offset() -> None:
    data = os.urandom(3000)
    with RangeReader(lambda a, b: data[a:b - 1], len(data), url="s3://b/store",
                     key="objects/b3/x", range_bytes=1024) as f:
        with pytest.raises(StoreError, match="range at byte 0 of 1,024") as e:
            f.read(10)
    assert e.value.url == "s3://b/store" and e.value.key == "objects/b3/x"


def test_fsspec_store_streams_objects_by_ranges() -> None:
    store = BlobStore(f"memory://bdn-ranges-{uuid.uuid4().hex}")
    data = os.urandom(2 * RANGE_SIZE_BYTES + 12_345)
    digest = Digest.of(data)
    store.put_chunk(digest, data)
    blocks = list(store.iter_object(digest, block_bytes=1 << 20))
    assert b"".join(blocks) == data and max(map(len, blocks)) <= 1 << 20
    with store.backend.open(object_key(digest)) as f:
        assert isinstance(f, RangeReader) and f.size == len(data)
    with pytest.raises(NotFoundError):
        store.backend.open(object_key(Digest.of(b"absent")))
