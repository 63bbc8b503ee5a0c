"""The node cache: eviction policy, budget reservations, pins, crash recovery."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import BudgetError
from cache.node import NodeCache, content_key
from manifests.digest import Digest
from manifests.manifest import Chunk, FileEntry


def _file(node: NodeCache, data: bytes, now: float) -> FileEntry:
    d = Digest.of(data)
    entry = FileEntry.from_chunks("f.bin", (Chunk(d, 0, len(data)),))
    fd, resumed = node.open_partial(entry, now)
    assert not resumed
    os.pwrite(fd, data, 0)
    node.mark_chunk(content_key(entry), 0, len(data), d)
    node.publish(entry, fd, now)
    os.close(fd)
    return entry


def test_reserve_evicts_lru_unpinned_and_refuses_what_cannot_fit(tmp_path: Path) -> None:
    node = NodeCache(tmp_path / "n", budget_bytes=300)
    a = _file(node, b"a" * 100, now=1.0)
    b = _file(node, b"b" * 100, now=2.0)
    node.pin("mount-1", [content_key(b)])
    want = {Digest.of(b"c" * 150): 150}
    assert node.reserve("pull-2", want, now=3.0) == 150
    assert not node.has_file(content_key(a)), "the least recently used file is evicted"
    assert not node.file_path(content_key(a)).exists()
    assert node.has_file(content_key(b)), "a pinned file stays"
    with pytest.raises(BudgetError) as err:
        node.reserve("pull-3", {Digest.of(b"d" * 400): 400}, now=4.0)
    assert "budget" in str(err.value) and err.value.needed == 400
    assert "pull-3" not in node.pin_holders(), "a refused reservation pins nothing"
    node.close()


def test_resume_keeps_the_journal_and_a_restart_recovers_orphans(tmp_path: Path) -> None:
    node = NodeCache(tmp_path / "n", budget_bytes=1 << 20)
    data = b"x" * 1000 + b"y" * 1000
    c1, c2 = Digest.of(data[:1000]), Digest.of(data[1000:])
    entry = FileEntry.from_chunks("f", (Chunk(c1, 0, 1000), Chunk(c2, 1000, 1000)))
    key = content_key(entry)
    fd, _ = node.open_partial(entry, 1.0)
    os.pwrite(fd, data[:1000], 0)
    node.mark_chunk(key, 0, 1000, c1)
    os.close(fd)
    node.close()
    # "Crash" and reopen: the journal and the chunk location survive.
    node = NodeCache(tmp_path / "n", budget_bytes=1 << 20)
    assert node.journal(key) == {0: c1}
    loc = node.chunk_location(c1)
    assert loc is not None and loc.partial and loc.file_hex == key.hex
    fd, resumed = node.open_partial(entry, 2.0)
    assert resumed
    os.pwrite(fd, data[1000:], 1000)
    node.mark_chunk(key, 1000, 1000, c2)
    node.publish(entry, fd, 3.0)
    os.close(fd)
    assert node.journal(key) == {} and node.has_file(key)
    assert node.chunk_location(c2).partial is False  # type: ignore[union-attr]
    # A file renamed into place whose row never got written is removed on recovery.
    orphan = node.file_path("ab" * 32)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan")
    assert node.recover()["orphan_files"] == 1 and not orphan.exists()
    assert node.stats()["files"] == 1
    node.close()


def test_a_crash_between_rename_and_index_adopts_the_verified_file(tmp_path: Path) -> None:
    node = NodeCache(tmp_path / "n", budget_bytes=1 << 20)
    data = b"p" * 3000
    d = Digest.of(data)
    entry = FileEntry.from_chunks("f", (Chunk(d, 0, 3000),))
    key = content_key(entry)
    fd, _ = node.open_partial(entry, 1.0)
    os.pwrite(fd, data, 0)
    node.mark_chunk(key, 0, 3000, d)
    # publish() up to the rename, then "kill -9": no index row is written.
    original = node._index_file
    node._index_file = lambda *a, **k: None  # type: ignore[method-assign]
    node.publish(entry, fd, 2.0)
    os.close(fd)
    node._index_file = original  # type: ignore[method-assign]
    node.close()
    node = NodeCache(tmp_path / "n", budget_bytes=1 << 20)
    assert not node.has_file(key) and node.file_path(key).exists()
    fixed = node.recover()
    assert fixed["adopted_files"] == 1 and fixed["orphan_files"] == 0
    assert node.has_file(key) and node.file_path(key).read_bytes() == data
    assert node.journal(key) == {} and node.partial_record(key) is None
    loc = node.chunk_location(d)
    assert loc is not None and not loc.partial and loc.file_hex == key.hex
    assert node.recover() == {"orphan_files": 0, "missing_files": 0, "orphan_partials": 0,
                              "adopted_files": 0}
    node.close()
