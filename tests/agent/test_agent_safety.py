"""Refusals before any write: hostile paths, planted symlinks, budgets, a full disk.

These run the real engine in-process (``agent.cli.run_standalone``, the same code the
daemon runs) against a real blob store: no service is needed to refuse a pull.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli import run_standalone
from agent.errors import PullError
from agent.options import AgentOptions
from bdn.store import BlobStore, object_key
from cache.node import NodeCache
from manifests.digest import Digest
from manifests.manifest import Chunk, canonical_json, file_digest
from tests.agent.agent_support import Model, assert_mount_matches


def _options(tmp_path: Path, store: Path, budget: int = 1 << 30,
             cache: Path | None = None) -> AgentOptions:
    return AgentOptions(cache_dir=cache or tmp_path / "node", budget_bytes=budget,
                        store_url=str(store))


def _plant_manifest(store: Path, path: str, ref: str, *,
                    claimed: Digest | None = None) -> None:
    """Write a manifest naming ``path`` straight into the store, past its validation;
    ``claimed``: a file digest other than the one its chunk list makes."""
    data = b"payload"
    d = Digest.of(data)
    own = file_digest([Chunk(d, 0, len(data))])
    bs = BlobStore(str(store))
    bs.backend.put(object_key(d), data)
    doc = {"version": 1, "source": {}, "files": [
        {"path": path, "size": len(data), "mode": 0o644, "digest": str(claimed or own),
         "chunks": [{"digest": str(d), "offset": 0, "length": len(data), "encoding": "raw",
                     "stored_length": len(data)}]}]}
    raw = canonical_json(doc)
    md = Digest.of(raw)
    bs.backend.put(object_key(md), raw)
    bs.backend.put(f"manifests/{md.hex}", b"")
    ns, rest = ref.split("/")
    model, tag = rest.split(":")
    bs.backend.put(f"refs/{ns}/{model}/{tag}", f"{md}\n".encode())


def _node_is_empty_and_consistent(cache: Path) -> None:
    if not cache.exists():
        return
    node = NodeCache(cache, 1 << 30)
    try:
        assert node.recover() == {"orphan_files": 0, "missing_files": 0,
                                  "orphan_partials": 0, "adopted_files": 0}
        stats = node.stats()
        assert stats["files"] == 0 and stats["partial_files"] == 0
        assert node.pinned() == set()
    finally:
        node.close()


@pytest.mark.parametrize("hostile", ["../escape.bin", "/tmp/absolute.bin",
                                     "a/../../escape.bin"])
def test_hostile_manifest_paths_are_refused_before_any_write(
        tmp_path: Path, base: Model, store: Path, hostile: str) -> None:
    _plant_manifest(store, hostile, "evil/model:v1")
    mount = tmp_path / "mounts" / "m"
    with pytest.raises(Exception) as err:
        run_standalone(_options(tmp_path, store), {"ref": "evil/model:v1",
                                                   "mount": str(mount)})
    assert "path" in str(err.value).lower() or "relative" in str(err.value).lower()
    assert not (tmp_path / "mounts").exists(), "nothing was created for the mount"
    assert not (tmp_path / "mounts" / "escape.bin").exists()
    assert not Path("/tmp/absolute.bin").exists()
    _node_is_empty_and_consistent(tmp_path / "node")


def test_planted_symlink_in_the_mount_is_refused_before_any_write(
        tmp_path: Path, base: Model, store: Path) -> None:
    mount = tmp_path / "m"
    outside = tmp_path / "outside"
    (mount).mkdir()
    outside.mkdir()
    os.symlink(outside, mount / "nested")
    with pytest.raises(PullError) as err:
        run_standalone(_options(tmp_path, store), {"ref": base.ref, "mount": str(mount)})
    assert "symlink" in str(err.value)
    assert list(outside.iterdir()) == [], "nothing was written through the symlink"
    assert sorted(p.name for p in mount.iterdir()) == ["nested"]
    _node_is_empty_and_consistent(tmp_path / "node")
    # The mount itself as a symlink is refused too.
    os.symlink(outside, tmp_path / "link-mount")
    with pytest.raises(Exception, match="symlink"):
        run_standalone(_options(tmp_path, store), {"ref": base.ref,
                                                   "mount": str(tmp_path / "link-mount")})
    assert list(outside.iterdir()) == []


def test_budget_smaller_than_the_model_is_a_clear_error(
        tmp_path: Path, base: Model, store: Path) -> None:
    mount = tmp_path / "m"
    with pytest.raises(PullError) as err:
        run_standalone(_options(tmp_path, store, budget=1_000_000),
                       {"ref": base.ref, "mount": str(mount)})
    msg = str(err.value)
    assert "budget of 1,000,000 bytes cannot hold" in msg and "--budget-bytes" in msg
    assert not mount.exists() or not any(mount.rglob("*"))
    _node_is_empty_and_consistent(tmp_path / "node")
    # With room, the same node cache then works.
    run_standalone(_options(tmp_path, store), {"ref": base.ref, "mount": str(mount)})
    assert_mount_matches(base.src, mount)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2.5 MiB tmpfs (root only): smaller than the model, larger than its index."""
    where = tmp_path / "tiny"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(where)],
                          capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): "
                    f"{proc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_is_a_clear_error_and_nothing_is_half_published(
        tmp_path: Path, base: Model, store: Path, tiny_disk: Path) -> None:
    cache = tiny_disk / "node"
    mount = tmp_path / "m"
    with pytest.raises(PullError) as err:
        run_standalone(_options(tmp_path, store, cache=cache),
                       {"ref": base.ref, "mount": str(mount)})
    assert "no space on the node's disk" in str(err.value)
    assert not mount.exists() or not any(p.is_file() for p in mount.rglob("*")), (
        "a failed pull publishes nothing in the mount")
    node = NodeCache(cache, 1 << 30)
    try:
        assert node.recover() == {"orphan_files": 0, "missing_files": 0,
                                  "orphan_partials": 0, "adopted_files": 0}, "files and index agree"
        for e in node.entries():
            path = node.partial_path(e.key) if e.partial else node.file_path(e.key)
            assert path.stat().st_size == e.size
        assert node.pinned() == set(), "a failed pull holds no pins"
    finally:
        node.close()
    with open(tiny_disk / "probe.json", "w") as f:
        json.dump({}, f)  # the filesystem is still usable


def test_a_manifest_lying_about_a_file_digest_cannot_poison_the_node_cache(
        tmp_path: Path, base: Model, store: Path) -> None:
    victim = base.manifest.file("config.json")
    _plant_manifest(store, "config.json", "evil/liar:v1", claimed=victim.digest)
    node = tmp_path / "node"
    # A file digest is the hash of the chunk list, so the lie is refused when the
    # manifest is parsed, before anything is written.
    with pytest.raises(PullError, match="does not match its chunk list"):
        run_standalone(_options(tmp_path, store, cache=node),
                       {"ref": "evil/liar:v1", "mount": str(tmp_path / "evil")})
    assert not (tmp_path / "evil").exists() or not any((tmp_path / "evil").rglob("*.json"))
    # The honest model pulled next on the same node gets its own bytes.
    run_standalone(_options(tmp_path, store, cache=node),
                   {"ref": base.ref, "mount": str(tmp_path / "good")})
    assert_mount_matches(base.src, tmp_path / "good")


def test_verify_files_rereads_every_chunk_before_publishing(
        tmp_path: Path, base: Model, store: Path) -> None:
    opts = AgentOptions(cache_dir=tmp_path / "node", budget_bytes=1 << 30,
                        store_url=str(store), verify_files=True)
    run_standalone(opts, {"ref": base.ref, "mount": str(tmp_path / "verified")})
    assert_mount_matches(base.src, tmp_path / "verified")
