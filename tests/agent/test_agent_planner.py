"""The pull planner is pure: every decision is checked here without disk or network."""

from __future__ import annotations

import pytest

from agent.planner import PlanOptions, PullTarget, plan_pull
from cache.node import ChunkLocation, content_key
from manifests.digest import Digest
from manifests.manifest import Chunk, FileEntry


def entry(path: str, *pieces: bytes) -> FileEntry:
    chunks, off = [], 0
    for p in pieces:
        chunks.append(Chunk(Digest.of(p), off, len(p)))
        off += len(p)
    return FileEntry.from_chunks(path, chunks)


A, B, C, D = b"a" * 10, b"b" * 20, b"c" * 30, b"d" * 40


def test_loader_order_small_files_first_then_weights_by_path() -> None:
    files = (entry("model-00002-of-00002.safetensors", A), entry("config.json", B),
             entry("model-00001-of-00002.safetensors", C), entry("tokenizer.json", D))
    plan = plan_pull([PullTarget("/m", files)], have_files=set(), chunk_locations={},
                     journals={})
    assert [f.entry.path for f in plan.files] == [
        "config.json", "tokenizer.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors"]
    by_path = plan_pull([PullTarget("/m", files)], have_files=set(), chunk_locations={},
                        journals={}, options=PlanOptions(order="path"))
    paths = [f.entry.path for f in by_path.files]
    assert paths[:2] == ["config.json", "model-00001-of-00002.safetensors"]


def test_cached_files_need_no_work_and_are_still_linked() -> None:
    f = entry("w.safetensors", A, B)
    plan = plan_pull([PullTarget("/m", (f,))], have_files={content_key(f)},
                     chunk_locations={}, journals={})
    assert plan.files == () and plan.cached == (f,)
    assert [(lk.mount, lk.path) for lk in plan.links] == [("/m", "w.safetensors")]
    assert plan.bytes_by_source()["cached"] == f.size


def test_resume_local_reuse_duplicates_and_network() -> None:
    base = entry("base.safetensors", A, B)
    tuned = entry("tuned.safetensors", A, C, C, D)
    loc = ChunkLocation(content_key(base).hex, 0, len(A), partial=False)
    journal = {content_key(tuned): {len(A): Digest.of(C)}}
    plan = plan_pull([PullTarget("/m", (tuned,))], have_files=set(),
                     chunk_locations={Digest.of(A): loc}, journals=journal)
    (fp,) = plan.files
    assert [t.source for t in fp.tasks] == ["local", "done", "dup", "network"]
    assert fp.tasks[0].location == loc
    assert fp.resumed
    by = plan.bytes_by_source()
    assert by == {"cached": 0, "done": len(C), "local": len(A), "network": len(D),
                  "dup": len(C)}


def test_a_chunk_shared_by_two_files_is_fetched_once() -> None:
    one, two = entry("one.bin", A, B), entry("two.bin", B, C)
    plan = plan_pull([PullTarget(None, (one, two))], have_files=set(), chunk_locations={},
                     journals={})
    sources = [(f.entry.path, t.chunk.digest, t.source) for f in plan.files for t in f.tasks]
    assert sources == [("one.bin", Digest.of(A), "network"),
                       ("one.bin", Digest.of(B), "network"),
                       ("two.bin", Digest.of(B), "dup"),
                       ("two.bin", Digest.of(C), "network")]
    assert plan.links == ()  # pre-warm: nothing to mount


def test_duplicate_files_are_written_once_and_linked_twice() -> None:
    f1, f2 = entry("a/x.bin", A, B), entry("b/x.bin", A, B)
    plan = plan_pull([PullTarget("/m", (f1, f2))], have_files=set(), chunk_locations={},
                     journals={})
    assert len(plan.files) == 1
    assert [lk.path for lk in plan.links] == ["a/x.bin", "b/x.bin"]
    assert {lk.digest for lk in plan.links} == {content_key(f1)}


def test_a_partial_location_in_the_same_file_is_not_a_source() -> None:
    f = entry("w.bin", A, B)
    stale = ChunkLocation(content_key(f).hex, 0, len(A), partial=True)
    plan = plan_pull([PullTarget(None, (f,))], have_files=set(),
                     chunk_locations={Digest.of(A): stale}, journals={})
    assert [t.source for t in plan.files[0].tasks] == ["network", "network"]


def test_content_key_is_the_chunk_list_digest_recomputed() -> None:
    single = entry("s.bin", A)
    assert content_key(single) == single.digest
    multi = entry("m.bin", A, B)
    assert content_key(multi) == multi.digest
    # A manifest that claims another file's digest with other chunks gets another key.
    liar = FileEntry(path="l.bin", size=multi.size, digest=multi.digest,
                     chunks=entry("z", C[:10], D[:20]).chunks)
    assert content_key(liar) != content_key(multi)


def test_plan_options_are_validated() -> None:
    with pytest.raises(ValueError):
        PlanOptions(order="random")
