"""Disks the agent does not choose: a mount on another file system, a full disk.

Real agent processes over real file systems: a tmpfs (``tests.support.tmpfs``) is the
second file system (a mount there cannot be hardlinked from the node cache on the disk,
so every file is copied) or the small, full disk (the node cache lives on it). The agent
is killed with ``kill -9`` at moments read from its own event stream, never after a
sleep.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from agent.errors import PullError
from bdn.fsutil import TEMP_MARKER, sweep_temps
from cache.node import INDEX_HEADROOM_BYTES, NodeCache, content_key
from cache.node_errors import DiskFullError
from manifests.digest import Digest
from manifests.manifest import Chunk, FileEntry
from tests.agent.agent_support import (
    Agent,
    Model,
    assert_mount_matches,
    mirror,
    start_proxy,
)
from tests.support.models import write_model_dir
from tests.support.procs import ServiceProcess
from tests.support.tmpfs import MiB, fill, free_bytes, mounted_tmpfs

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

KILLS = 10


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: another file system than the disk under ``tmp_path``."""
    with mounted_tmpfs(tmp_path / "tmpfs", 64 * MiB) as path:
        yield path


def _digests(root: Path) -> dict[str, str]:
    """Relative path → BLAKE3 of the bytes, for every file under ``root`` (dotfiles too)."""
    return {p.relative_to(root).as_posix(): blake3.blake3(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_nothing_partial(src: Path, mount: Path) -> None:
    """Every name under the mount is a whole source file: no partial copy, no temporary."""
    if not mount.exists():
        return
    want = _digests(src)
    for rel, digest in _digests(mount).items():
        assert rel in want, f"{rel} is visible under the mount but is no file of the model"
        assert digest == want[rel], f"{rel} is visible under the mount but partial"


def test_kill9_during_cross_device_publish_leaves_nothing_partial_and_resumes(
        tmp_path: Path, other_fs: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    mount = other_fs / "models" / "llama"
    proxy = start_proxy(cache_server.url, "--delay-ms", "5")
    try:
        agent = Agent(tmp_path, peers=(proxy.url,),
                      extra=("--strict", "--max-connections", "2"))
        agents.append(agent)
        assert os.stat(agent.cache_dir).st_dev != os.stat(other_fs).st_dev
        rng = random.Random(11)
        pull_id = agent.client.start_pull(ref=base.ref, mount=str(mount),
                                          idempotency_key="xdev")["id"]
        planted: list[Path] = []
        for i in range(KILLS):
            # Count verified chunks and published files (each one a copy onto the tmpfs
            # that just ended, with the next possibly under way); kill on the n-th.
            kill_after = rng.randint(1, 4)
            seen = 0
            for ev in agent.client.events(pull_id):
                assert ev["event"] not in ("done", "error"), f"the pull ended at kill {i}"
                if ev["event"] == "file" or (ev["event"] == "chunk" and ev["tier"] != "node"):
                    seen += 1
                    if seen >= kill_after:
                        agent.proc.kill9()
                        break
            _assert_nothing_partial(base.src, mount)
            if not planted:
                # What a copy killed mid-way leaves on a file system without O_TMPFILE:
                # a temporary name of the dead agent beside its target — in a folder the
                # agent made (one the test made would be a user's, never sealed).
                rel = next((r for r in sorted(_digests(base.src))
                            if (mount / r).parent.is_dir()), None)
                if rel is not None:
                    target = mount / rel
                    leftover = target.parent / (
                        f".{target.name}{TEMP_MARKER}{agent.proc.pid}-0badc0de")
                    leftover.write_bytes(b"half a file")
                    planted.append(leftover)
            agent.restart()  # sweeps leftovers, then resumes the persisted pull
            assert not any(p.exists() for p in planted), "leftovers swept at agent start"
        assert planted, "no kill left a folder of the mount to plant a leftover in"
        status = agent.client.wait(pull_id)
        assert status["state"] == "done"
        assert _digests(mount) == _digests(base.src), "resumed pull is byte-identical"
        assert_mount_matches(base.src, mount)
        assert not [p for p in mount.rglob("*") if TEMP_MARKER in p.name]
        first = next(p for p in mount.rglob("*") if p.is_file())
        assert os.stat(first).st_nlink == 1, "a copy on the tmpfs, not a hardlink"
    finally:
        proxy.stop()


def test_sweep_takes_only_dead_temporaries_of_the_named_files(tmp_path: Path) -> None:
    live = tmp_path / f".a.bin{TEMP_MARKER}{os.getpid()}-0000beef"
    dead = tmp_path / f".a.bin{TEMP_MARKER}999999999-0000beef"
    other_file = tmp_path / f".b.bin{TEMP_MARKER}999999999-0000beef"
    not_ours = [tmp_path / ".a.bin.tmp-999999999-0000beef", tmp_path / "a.bin",
                tmp_path / f".a.bin{TEMP_MARKER}999999999-xyz"]
    for p in (live, dead, other_file, *not_ours):
        p.write_bytes(b"x")
    assert sweep_temps(tmp_path, ["a.bin"]) == 1
    assert not dead.exists()
    assert live.exists() and other_file.exists() and all(p.exists() for p in not_ours)


# -- full disks --------------------------------------------------------------------------

def _model_only(model: Model, other: Model) -> dict[str, int]:
    """File keys (hex) of ``model`` that ``other`` lacks → their sizes."""
    theirs = {content_key(f).hex for f in other.manifest.files}
    return {content_key(f).hex: f.size for f in model.manifest.files
            if content_key(f).hex not in theirs}


def _small_model(tmp_path: Path, store: Path) -> Model:
    src = tmp_path / "src-small"
    src.mkdir()
    (src / "small.bin").write_bytes(random.Random(3).randbytes(4096))
    return mirror(store, src, "test/small:v1")


def _assert_clear_disk_full(message: str, path: Path) -> None:
    assert "no space on the node's disk" in message, message
    assert str(path) in message and "bytes" in message, message
    assert "mdb_" not in message and "Input/output" not in message, message


def test_full_disk_evicts_unpinned_files_then_fails_clearly_and_serves_a_small_pull(
        tmp_path: Path, other_fs: Path, store: Path, agents: list[Agent]) -> None:
    # Two models of about 15 MB that share no tensor (a shared config file or two).
    for name, seed in (("one", 0), ("two", 7)):
        write_model_dir(tmp_path / f"src-{name}", layers=2, hidden=512, shards=2, seed=seed)
    base = mirror(store, tmp_path / "src-one", "test/one:v1")
    other = mirror(store, tmp_path / "src-two", "test/two:v1")
    small = _small_model(tmp_path, store)
    # The node cache on the 64 MiB tmpfs; a budget far above what that disk holds.
    agent = Agent(other_fs, store=store, budget="1G")
    agents.append(agent)
    files_dir = agent.cache_dir / "files"
    agent.client.wait(agent.client.start_pull(ref=base.ref, prewarm=True)["id"])
    base_only, other_only = _model_only(base, other), _model_only(other, base)
    assert all((files_dir / h[:2] / h).exists() for h in base_only)

    # 1. The other model does not fit on the disk until base's unpinned files go.
    filler = other_fs / "filler"  # the test's file, not bdn's
    fill(filler, leave_bytes=sum(other_only.values()) - sum(base_only.values()) // 4)
    assert sum(base_only.values()) // 4 > INDEX_HEADROOM_BYTES
    st = agent.client.wait(agent.client.start_pull(ref=other.ref,
                                                   mount=str(tmp_path / "m-other"))["id"])
    assert st["state"] == "done"
    assert_mount_matches(other.src, tmp_path / "m-other")
    evicted = [h for h in base_only if not (files_dir / h[:2] / h).exists()]
    assert evicted, "unpinned files of the first model were evicted to make room"

    # 2. Nothing left to evict (the other model is pinned by its mount): a clear error.
    filler.unlink()
    needed = sum(base_only[h] for h in evicted)
    fill(filler, leave_bytes=INDEX_HEADROOM_BYTES + needed // 2)
    failed = agent.client.start_pull(ref=base.ref, mount=str(tmp_path / "m-base"))["id"]
    with pytest.raises(PullError) as exc:
        agent.client.wait(failed)
    _assert_clear_disk_full(str(exc.value), agent.cache_dir)
    assert f"{needed:,d} more bytes" in str(exc.value), "names the bytes needed"
    partials = {p.name for p in (agent.cache_dir / "partial").iterdir()}
    assert not partials & set(evicted), "the failed pull's partial files are reclaimed"
    assert not (tmp_path / "m-base").exists() or not any(
        p.is_file() for p in (tmp_path / "m-base").rglob("*"))

    # 3. The agent still serves what fits.
    st = agent.client.wait(agent.client.start_pull(ref=small.ref,
                                                   mount=str(tmp_path / "m-small"))["id"])
    assert st["state"] == "done"
    assert_mount_matches(small.src, tmp_path / "m-small")


def test_index_on_a_full_disk_gives_the_clear_message_and_recovers(
        tmp_path: Path, other_fs: Path, store: Path, base: Model,
        agents: list[Agent]) -> None:
    small = _small_model(tmp_path, store)
    agent = Agent(other_fs, store=store, budget="1G")
    agents.append(agent)
    filler = other_fs / "filler"
    fill(filler)  # every byte: the index cannot grow by a page
    assert free_bytes(other_fs) < 64 * 1024
    with pytest.raises(PullError) as exc:
        agent.client.wait(agent.client.start_pull(ref=small.ref,
                                                  mount=str(tmp_path / "m1"))["id"])
    _assert_clear_disk_full(str(exc.value), agent.cache_dir)
    filler.unlink()
    st = agent.client.wait(agent.client.start_pull(ref=small.ref,
                                                   mount=str(tmp_path / "m2"))["id"])
    assert st["state"] == "done"
    assert_mount_matches(small.src, tmp_path / "m2")


def _entry(path: str, size: int, seed: int) -> FileEntry:
    data = random.Random(seed).randbytes(size)
    chunk = Chunk(digest=Digest(blake3.blake3(data).hexdigest()), offset=0, length=size)
    return FileEntry.from_chunks(path, [chunk])


def test_disk_full_mid_pull_names_bytes_and_path_and_partials_are_reclaimed(
        other_fs: Path) -> None:
    node = NodeCache(other_fs / "node", 1 << 30)
    try:
        first, second = _entry("a.bin", 4 * MiB, 1), _entry("b.bin", 8 * MiB, 2)
        fd, _ = node.open_partial(first, now=1.0)
        os.close(fd)
        node.pin("pull-1", [content_key(first), content_key(second)])
        fill(other_fs / "filler", leave_bytes=4 * MiB)  # someone else filled the disk
        with pytest.raises(DiskFullError) as exc:
            node.open_partial(second, now=1.0)
        assert exc.value.needed == 8 * MiB and f"{8 * MiB:,d} bytes" in str(exc.value)
        assert exc.value.path == str(node.partial_path(content_key(second)))
        # Pinned by the pull: kept. Once the failed pull lets go: reclaimed.
        assert node.reclaim_partials([content_key(first), content_key(second)]) == 0
        node.unpin("pull-1", [content_key(first), content_key(second)])
        assert node.reclaim_partials([content_key(first), content_key(second)]) == 1
        assert not node.partial_path(content_key(first)).exists()
        assert node.partial_record(content_key(first)) is None
    finally:
        node.close()


def test_a_full_file_system_under_the_mount_names_bytes_and_path(
        tmp_path: Path, base: Model, agents: list[Agent]) -> None:
    agent = Agent(tmp_path, store=tmp_path / "store")
    agents.append(agent)
    with mounted_tmpfs(tmp_path / "tiny", 1 * MiB) as tiny:
        mount = tiny / "llama"
        with pytest.raises(PullError) as exc:
            agent.client.wait(agent.client.start_pull(ref=base.ref, mount=str(mount))["id"])
        message = str(exc.value)
        assert "no space to copy" in message and str(mount) in message, message
        assert "bytes" in message and "Errno" not in message, message
        assert not mount.exists() or not [p for p in mount.rglob("*") if p.is_file()], (
            "nothing partial (nor whole) stays in the mount of a failed pull")
    st = agent.client.wait(agent.client.start_pull(ref=base.ref,
                                                   mount=str(tmp_path / "m"))["id"])
    assert st["state"] == "done"
    assert_mount_matches(base.src, tmp_path / "m")
