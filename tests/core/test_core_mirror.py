"""Local mirror: byte-identical round trips, tensor-level dedup, crash safety, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bdn.export import export_manifest
from bdn.mirror import Mirror, MirrorOptions
from bdn.sources import open_source
from bdn.store import BlobStore, CompressionOptions, StoreOptions
from manifests.chunking import ChunkingOptions
from manifests.digest import Digest
from manifests.refs import Ref
from tests.support.models import llama_tensors, write_model_dir, write_sharded
from tests.support.procs import ServiceProcess, bdn_command

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

KiB = 1024
SMALL = ChunkingOptions(tensor_piece_bytes=64 * KiB, group_max_bytes=16 * KiB,
                        cdc_min_bytes=4 * KiB, cdc_avg_bytes=16 * KiB, cdc_max_bytes=64 * KiB,
                        small_file_bytes=4 * KiB)


def tree_digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def mirror(store: BlobStore, src: Path, ref: str, opts: ChunkingOptions = SMALL,
           **kw: object):
    return Mirror(store, MirrorOptions(chunking=opts)).run(
        open_source(str(src)), ref=Ref.parse(ref), **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(str(tmp_path / "store"))


def test_round_trip_is_byte_identical(tmp_path: Path, store: BlobStore) -> None:
    src = tmp_path / "model"
    write_model_dir(src, layers=2, hidden=256, shards=3)
    (src / "one_chunk.bin").write_bytes(os.urandom(3 * KiB))
    (src / "exact_multiple.bin").write_bytes(b"\x07" * (128 * KiB))
    # a safetensors file whose big tensor is exactly two pieces long
    write_sharded(src / "exact", {"w": llama_tensors(1, 128)["model.norm.weight"].repeat(512)},
                  prefix="exact")
    res = mirror(store, src, "t/model:v1")
    out = tmp_path / "out"
    export_manifest(store, store.get_manifest(res.manifest_digest), out)
    assert tree_digests(out) == tree_digests(src)
    m = store.get_manifest(store.get_ref(Ref.parse("t/model:v1")))
    assert {f.path for f in m.files} == set(tree_digests(src))
    assert m.file("empty.txt").size == 0 and m.file("empty.txt").chunks == ()


def test_remirror_of_unchanged_input_uploads_nothing(tmp_path: Path, store: BlobStore) -> None:
    src = tmp_path / "model"
    write_model_dir(src)
    first = mirror(store, src, "t/m:a")
    again = mirror(store, src, "t/m:b")
    assert first.stats.objects_new > 0
    assert again.stats.bytes_uploaded == 0 and again.stats.objects_new == 0
    assert again.stats.files_reused == again.stats.files
    assert again.manifest_digest == first.manifest_digest


def test_fine_tune_adds_only_changed_tensors_and_header(tmp_path: Path,
                                                        store: BlobStore) -> None:
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    changed = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    tensors = write_model_dir(base, layers=2, hidden=256)
    write_model_dir(tuned, layers=2, hidden=256, changed=changed)
    mirror(store, base, "t/base:v1")
    before = {d for d, _, _ in store.iter_objects()}
    res = mirror(store, tuned, "t/tuned:v1")
    changed_bytes = sum(tensors[n].nbytes for n in changed)
    m = store.get_manifest(res.manifest_digest)
    header_bytes = m.file("model.safetensors").chunks[0].length
    assert res.stats.bytes_uploaded <= changed_bytes + header_bytes
    assert res.stats.bytes_uploaded >= changed_bytes
    new = {d for d, _, _ in store.iter_objects()} - before
    # the changed tensors' 64 KiB pieces and the new manifest; the header is unchanged
    # (same names, shapes and offsets), so it is shared too
    pieces = sum(-(-tensors[n].nbytes // (64 * KiB)) for n in changed)
    assert len(new) == pieces + 1


def test_resharded_weights_add_at_most_5_percent(tmp_path: Path, store: BlobStore) -> None:
    tensors = llama_tensors(layers=4, hidden=256)
    one, three = tmp_path / "one", tmp_path / "three"
    write_sharded(one, tensors, shards=1)
    write_sharded(three, tensors, shards=3)
    mirror(store, one, "t/one:v1")
    res = mirror(store, three, "t/three:v1")
    total = sum(a.nbytes for a in tensors.values())
    assert res.stats.bytes_uploaded <= 0.05 * total, (res.stats, total)


def test_identical_files_in_two_models_are_stored_once(tmp_path: Path,
                                                       store: BlobStore) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_model_dir(a, seed=1)
    write_model_dir(b, seed=2)
    (a / "copy.json").write_bytes((a / "tokenizer.json").read_bytes())
    mirror(store, a, "t/a:v1")
    res = mirror(store, b, "t/b:v1")
    # b's tokenizer/config files equal a's: only b's safetensors chunks are new
    m = store.get_manifest(res.manifest_digest)
    assert m.file("tokenizer.json").chunks[0].digest == Digest.of(
        (a / "tokenizer.json").read_bytes())
    st_bytes = sum(c.length for c in m.file("model.safetensors").chunks)
    assert res.stats.bytes_uploaded <= st_bytes
    objects = [d for d, _, _ in store.iter_objects()]
    assert len(objects) == len(set(objects))


def test_duplicate_files_export_as_hardlinks(tmp_path: Path, store: BlobStore) -> None:
    src = tmp_path / "m"
    src.mkdir()
    data = os.urandom(50 * KiB)
    (src / "a.bin").write_bytes(data)
    (src / "sub").mkdir()
    (src / "sub" / "b.bin").write_bytes(data)
    res = mirror(store, src, "t/dup:v1")
    assert res.stats.objects_reused >= 1
    out = tmp_path / "out"
    stats = export_manifest(store, store.get_manifest(res.manifest_digest), out)
    assert stats.hardlinks == 1
    assert os.stat(out / "a.bin").st_ino == os.stat(out / "sub" / "b.bin").st_ino


def test_broken_safetensors_is_chunked_as_opaque(tmp_path: Path, store: BlobStore) -> None:
    src = tmp_path / "m"
    src.mkdir()
    bad = (2**60).to_bytes(8, "little") + b"{}" + os.urandom(40 * KiB)
    (src / "bad.safetensors").write_bytes(bad)
    (src / "tiny.safetensors").write_bytes(b"\x01")
    res = mirror(store, src, "t/bad:v1")
    out = tmp_path / "out"
    export_manifest(store, store.get_manifest(res.manifest_digest), out)
    assert (out / "bad.safetensors").read_bytes() == bad


def test_zero_heavy_objects_are_compressed_where_it_pays(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path / "s"), StoreOptions(CompressionOptions(min_ratio=2.0)))
    src = tmp_path / "m"
    src.mkdir()
    (src / "zeros.bin").write_bytes(b"\0" * (200 * KiB))
    (src / "random.bin").write_bytes(os.urandom(200 * KiB))
    res = mirror(store, src, "t/z:v1")
    m = store.get_manifest(res.manifest_digest)
    # every chunk big enough to be worth it (≥ min_object_bytes) is compressed
    assert {c.encoding for c in m.file("zeros.bin").chunks if c.length >= 64 * KiB} == {"zstd"}
    assert {c.encoding for c in m.file("random.bin").chunks} == {"raw"}
    z = m.file("zeros.bin").chunks[0]
    assert z.stored_length < z.length / 2
    out = tmp_path / "out"
    export_manifest(store, m, out)
    assert (out / "zeros.bin").read_bytes() == b"\0" * (200 * KiB)


def check_store_consistent(store: BlobStore) -> None:
    """No ref, manifest or fingerprint entry points at a missing object."""
    for digest in store.list_manifests():
        m = store.get_manifest(digest)
        for c in m.unique_chunks().values():
            assert store.has_object(c.digest), f"manifest {digest} names missing {c.digest}"
    for ref, digest in store.list_refs():
        assert digest in store.list_manifests(), f"{ref} dangles"
    for key, _ in store.backend.list("fingerprints"):
        doc = json.loads(store.backend.get(key))
        for c in doc["chunks"]:
            assert store.has_object(Digest.parse(c["digest"]))


def test_killing_the_mirror_anywhere_leaves_no_dangling_pointer(tmp_path: Path) -> None:
    src = tmp_path / "model"
    write_model_dir(src, layers=2, hidden=1024, shards=2)
    store_dir = tmp_path / "store"
    rnd = random.Random(42)
    kill_points = sorted(rnd.sample(range(1, 30), 4))
    for k in kill_points:
        proc = ServiceProcess(bdn_command("mirror", str(src), "--ref", "t/crash:v1",
                                          "--store", str(store_dir), "--events"),
                              ready_prefix=None)
        try:
            proc.wait_count('"event": "object"', k, timeout_s=120)
            proc.kill9()
        finally:
            proc.stop()
        check_store_consistent(BlobStore(str(store_dir)))
    done = subprocess.run(bdn_command("mirror", str(src), "--ref", "t/crash:v1", "--store",
                                      str(store_dir), "--json"),
                          capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    store = BlobStore(str(store_dir))
    check_store_consistent(store)
    out = tmp_path / "out"
    export_manifest(store, store.get_manifest(Digest.parse(summary["manifest"])), out)
    assert tree_digests(out) == tree_digests(src)


def test_cli_mirror_json_export_show_stats(tmp_path: Path) -> None:
    src = tmp_path / "m"
    write_model_dir(src)
    store = str(tmp_path / "store")
    run = [sys.executable, "-m", "bdn.cli"]
    out = subprocess.run([*run, "mirror", str(src), "--ref", "ns/m:v1", "--store", store,
                          "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    for key in ("manifest", "files", "logical_bytes", "bytes_uploaded", "objects_new",
                "objects_reused", "seconds"):
        assert key in summary
    assert summary["files"] == 6
    shutil.rmtree(tmp_path / "export", ignore_errors=True)
    subprocess.run([*run, "export", "ns/m:v1", str(tmp_path / "export"), "--store", store],
                   check=True, capture_output=True)
    assert tree_digests(tmp_path / "export") == tree_digests(src)
    show = subprocess.run([*run, "manifest", "show", "ns/m:v1", "--base", "ns/m:v1",
                           "--store", store], capture_output=True, text=True, check=True)
    assert "0 B new" in show.stdout and "model.safetensors" in show.stdout
    stats = subprocess.run([*run, "store", "stats", "--json", "--store", store],
                           capture_output=True, text=True, check=True)
    doc = json.loads(stats.stdout)
    assert doc["manifests"] == 1 and doc["refs"] == 1
    assert doc["logical_bytes_referenced"] == summary["logical_bytes"]
    bad = subprocess.run([*run, "export", "ns/missing:v1", str(tmp_path / "x"), "--store",
                          store], capture_output=True, text=True)
    assert bad.returncode == 1 and "ref ns/missing:v1 not found" in bad.stderr


def test_export_refuses_symlink_planted_in_destination(tmp_path: Path,
                                                        store: BlobStore) -> None:
    from bdn.errors import PathError

    src = tmp_path / "m"
    write_model_dir(src)
    res = mirror(store, src, "t/m:v1")
    dest = tmp_path / "dest"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, dest / "nested")
    with pytest.raises(PathError, match="symlink"):
        export_manifest(store, store.get_manifest(res.manifest_digest), dest)
    assert list(outside.iterdir()) == []


def test_repeated_chunks_within_one_file_are_stored_once(tmp_path: Path,
                                                         store: BlobStore) -> None:
    import numpy as np

    same = np.arange(64 * KiB, dtype=np.float16)  # 128 KiB: two 64 KiB pieces
    src = tmp_path / "m"
    write_sharded(src, {"a": same, "b": np.ones(16, dtype=np.float16), "c": same.copy(),
                        "d": same.copy()})
    res = mirror(store, src, "t/rep:v1")
    m = store.get_manifest(res.manifest_digest)
    digests = [c.digest for c in m.file("model.safetensors").chunks]
    assert len(digests) > len(set(digests))
    assert res.stats.objects_reused == len(digests) - len(set(digests))
    out = tmp_path / "out"
    export_manifest(store, m, out)
    assert tree_digests(out) == tree_digests(src)
