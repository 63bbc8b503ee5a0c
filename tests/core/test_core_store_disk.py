"""The local store on file systems it does not choose: another one than the source, a
full one, and what a killed writer leaves behind.

A tmpfs (``tests.support.tmpfs``) is the second file system: ``copy_file_range`` from a
file on the disk into it fails with ``EXDEV``, and a small one fills up. Writers are
killed with ``kill -9`` at moments read from their own output, never after a sleep.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bdn.errors import BdnError, SourceError, StoreError, StoreFullError
from bdn.export import export_manifest
from bdn.mirror import Mirror, MirrorOptions
from bdn.sources import open_source
from bdn.store import TMP_MARKER, BlobStore
from manifests.chunking import ChunkingOptions
from manifests.digest import Digest
from manifests.refs import Ref
from tests.support.models import write_model_dir
from tests.support.procs import ServiceProcess, bdn_command
from tests.support.tmpfs import MiB, mounted_tmpfs

KiB = 1024
SMALL = ChunkingOptions(tensor_piece_bytes=64 * KiB, group_max_bytes=16 * KiB,
                        cdc_min_bytes=4 * KiB, cdc_avg_bytes=16 * KiB, cdc_max_bytes=64 * KiB,
                        small_file_bytes=4 * KiB)


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tmpfs", 64 * MiB) as path:
        yield path


def _mirror(store: BlobStore, src: Path, ref: str) -> Digest:
    source = open_source(str(src))
    try:
        return Mirror(store, MirrorOptions(chunking=SMALL)).run(
            source, ref=Ref.parse(ref)).manifest_digest
    finally:
        source.close()


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TMP_MARKER in p.name]


def _assert_objects_whole(store: BlobStore) -> None:
    """Every object a listing shows has exactly the bytes its name says."""
    for digest, _encoding, _size in store.iter_objects():
        store.get_object(digest)  # verifies


@pytest.mark.parametrize("where", ["source", "store"])
def test_a_local_source_on_another_file_system_mirrors_byte_identical(
        tmp_path: Path, other_fs: Path, where: str) -> None:
    src = (other_fs if where == "source" else tmp_path) / "model"
    store_dir = (other_fs if where == "store" else tmp_path) / "store"
    write_model_dir(src, layers=2, hidden=256, shards=2)
    assert os.stat(src).st_dev != os.stat(store_dir.parent).st_dev
    store = BlobStore(str(store_dir))
    digest = _mirror(store, src, "t/xdev:v1")
    export_manifest(store, store.get_manifest(digest), tmp_path / "out")
    assert _tree(tmp_path / "out") == _tree(src)
    assert not _temporaries(store_dir)


def test_a_full_store_says_the_store_is_full(tmp_path: Path) -> None:
    src = tmp_path / "model"
    write_model_dir(src, layers=2, hidden=512, shards=2)  # about 12 MB
    with mounted_tmpfs(tmp_path / "small", 4 * MiB) as small:
        store = BlobStore(str(small / "store"))
        with pytest.raises(StoreFullError) as exc:
            _mirror(store, src, "t/full:v1")
        err = exc.value
        assert isinstance(err, StoreError) and isinstance(err, BdnError)
        assert not isinstance(err, SourceError)
        assert "is full" in str(err) and str(small / "store") in str(err)
        assert err.path.startswith(str(small / "store")) and err.needed > 0
        assert f"{err.needed:,d} bytes" in str(err)
        assert not _temporaries(small / "store"), "nothing half-written stays"
        _assert_objects_whole(store)


CHILD_RECEIVING = """
import signal, sys
from bdn.store import BlobStore
incoming = BlobStore(sys.argv[1]).incoming(1 << 20)
incoming.write(b"x" * (1 << 19))
print("BDN_LISTENING", incoming.tmp, flush=True)
signal.pause()
"""


@pytest.mark.slow
def test_temporaries_of_killed_writers_are_swept_by_the_next_mirror_run(
        tmp_path: Path, other_fs: Path) -> None:
    src = tmp_path / "model"  # on the disk; the store on the tmpfs: EXDEV for every copy
    write_model_dir(src, layers=2, hidden=512, shards=2)
    store_dir = other_fs / "store"
    # A writer killed while it receives a chunk (as a streaming mirror does).
    child = ServiceProcess([sys.executable, "-c", CHILD_RECEIVING, str(store_dir)])
    receiving = Path(str(child.url))
    child.kill9()
    child.stop()
    assert receiving.exists() and TMP_MARKER in receiving.name
    # Mirrors killed at points read from their event stream.
    for k in (3, 17, 40):
        proc = ServiceProcess(bdn_command("mirror", str(src), "--ref", "t/kill:v1",
                                          "--store", str(store_dir), "--events"),
                              ready_prefix=None)
        try:
            proc.wait_count('"event": "object"', k, timeout_s=120)
            proc.kill9()
        finally:
            proc.stop()
        _assert_objects_whole(BlobStore(str(store_dir)))
    digest = _mirror(BlobStore(str(store_dir)), src, "t/kill:v1")
    assert not _temporaries(store_dir), "the next run swept every dead writer's temporary"
    store = BlobStore(str(store_dir))
    export_manifest(store, store.get_manifest(digest), tmp_path / "out")
    assert _tree(tmp_path / "out") == _tree(src)


def test_sweep_keeps_a_live_writers_temporary(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path / "store"))
    live = store.incoming(10)
    live.write(b"12345")
    assert BlobStore(str(tmp_path / "store")).sweep_incoming(now=0.0) == 0
    assert Path(live.tmp).exists()  # type: ignore[attr-defined]
    live.close()
