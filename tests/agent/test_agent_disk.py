"""Disks the agent does not choose: a mount on another file system, a full disk.

Real agent processes over real file systems: a tmpfs (``tests.support.tmpfs``) is the
second file system (a mount there cannot be hardlinked from the node cache on the disk,
so every file is copied) or the small, full disk (the node cache lives on it). The agent
is killed with ``kill -9`` at moments read from its own event stream, never after a
sleep.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from agent.errors import PullError
from bdn.fsutil import TEMP_MARKER, sweep_temps
from cache.node import INDEX_HEADROOM_BYTES
from tests.agent.agent_support import (
    Agent,
    Model,
    assert_mount_matches,
    make_model,
    mirror,
    start_proxy,
)
from tests.support.models import write_model_dir
from tests.support.procs import ServiceProcess
from tests.support.tmpfs import MiB, fill, free_bytes, mounted_tmpfs

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
            if i == 0:
                # What a copy killed mid-way leaves on a file system without O_TMPFILE:
                # a temporary name of the dead agent beside its target.
                (mount / "nested").mkdir(parents=True, exist_ok=True)
                leftover = mount / "nested" / (
                    f".config-copy.json{TEMP_MARKER}{agent.proc.pid}-0badc0de")
                leftover.write_bytes(b"half a file")
                planted.append(leftover)
            agent.restart()  # sweeps leftovers, then resumes the persisted pull
            assert not any(p.exists() for p in planted), "leftovers swept at agent start"
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
