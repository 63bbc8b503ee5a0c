"""The disk store: budget with reservations, pins, and what survives a restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cache.disk import DiskOptions, DiskStore
from cache.errors import DiskStoreError
from manifests.digest import Digest


def fill(disk: DiskStore, data: bytes, now: float = 0.0) -> Digest | None:
    d = Digest.of(data)
    slot = disk.begin_fill(d, len(data), now=now)
    if slot is None:
        return None
    os.write(slot.fd, data)
    disk.commit_fill(slot, now=now)
    return d


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size
            for p in root.rglob("*") if p.is_file() and "index" not in p.parts}


def test_budget_counts_fills_in_flight_and_evicts_lru(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path, DiskOptions(budget_bytes=300))
    a = fill(disk, b"a" * 100, now=1)
    b = fill(disk, b"b" * 100, now=2)
    assert a and b
    disk.touch(a, now=3)  # a is now more recent than b
    slot = disk.begin_fill(Digest.of(b"c" * 100), 100, now=4)  # reserved, not complete
    assert slot is not None
    assert disk.usage().used_bytes + disk.usage().reserved_bytes == 300
    d = fill(disk, b"d" * 100, now=5)  # must evict b (LRU), not a, not the fill in flight
    assert d and disk.lookup(b) is None and disk.lookup(a) is not None
    assert sum(files_under(tmp_path).values()) <= 300
    disk.abort_fill(slot)
    assert disk.usage().reserved_bytes == 0 and not list((tmp_path / "partial").iterdir())


def test_pinned_objects_survive_and_too_large_objects_get_no_slot(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path, DiskOptions(budget_bytes=200))
    a = fill(disk, b"a" * 100, now=1)
    b = fill(disk, b"b" * 100, now=2)
    assert a and b
    disk.pin(a)
    disk.pin(b)
    assert disk.begin_fill(Digest.of(b"c" * 100), 100, now=3) is None  # all pinned
    assert disk.begin_fill(Digest.of(b"x" * 300), 300, now=3) is None  # larger than budget
    disk.unpin(b)
    assert fill(disk, b"c" * 100, now=4) is not None
    assert disk.lookup(a) is not None and disk.lookup(b) is None


def test_restart_keeps_complete_and_discards_partial_and_unknown(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path, DiskOptions(budget_bytes=1000))
    kept = fill(disk, b"k" * 100)
    assert kept
    partial = disk.begin_fill(Digest.of(b"p" * 100), 100)
    assert partial is not None
    os.write(partial.fd, b"p" * 50)  # a fill cut short by a crash: never closed
    # A verified file renamed into place whose index entry never said "complete".
    stray = Digest.of(b"s" * 10)
    stray_path = disk.object_path(stray)
    stray_path.parent.mkdir(parents=True, exist_ok=True)
    stray_path.write_bytes(b"s" * 10)
    # A complete entry whose file was truncated behind our back.
    trunc = fill(disk, b"t" * 100)
    assert trunc
    disk.flush()
    os.truncate(disk.object_path(trunc), 40)
    os.close(partial.fd)
    disk._env.close()  # no clean close: as after kill -9 (which also drops the lock)
    os.close(disk._lock_fd)

    again = DiskStore(tmp_path, DiskOptions(budget_bytes=1000))
    assert again.lookup(kept) is not None
    assert again.object_path(kept).read_bytes() == b"k" * 100
    assert again.lookup(Digest.of(b"p" * 100)) is None
    assert again.lookup(stray) is None and not stray_path.exists()
    assert again.lookup(trunc) is None and not again.object_path(trunc).exists()
    assert not list((tmp_path / "partial").iterdir())
    assert again.usage().used_bytes == 100 and again.usage().reserved_bytes == 0
    # The partial's digest can be filled afresh.
    assert fill(again, b"p" * 100) is not None
    again.close()


def test_restart_with_smaller_budget_evicts_down_to_it(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path, DiskOptions(budget_bytes=1000))
    for i in range(5):
        assert fill(disk, bytes([i]) * 100, now=i)
    disk.close()
    small = DiskStore(tmp_path, DiskOptions(budget_bytes=250))
    assert small.usage().used_bytes <= 250
    assert small.lookup(Digest.of(bytes([4]) * 100)) is not None  # most recent kept
    assert small.lookup(Digest.of(bytes([0]) * 100)) is None
    small.close()


def test_drop_removes_even_a_pinned_bad_copy(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path, DiskOptions(budget_bytes=1000))
    a = fill(disk, b"a" * 100)
    assert a
    disk.pin(a)
    assert disk.drop(a) and disk.lookup(a) is None and not disk.object_path(a).exists()
    assert not disk.drop(a)
    disk.close()


def test_one_process_per_folder(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path, DiskOptions(budget_bytes=100))
    with pytest.raises(DiskStoreError, match="in use"):
        DiskStore(tmp_path, DiskOptions(budget_bytes=100))
    disk.close()
    DiskStore(tmp_path, DiskOptions(budget_bytes=100)).close()
