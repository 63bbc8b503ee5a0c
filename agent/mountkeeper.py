"""Shared mounts: who uses each path of a mount, and what the agent created there.

Mounts are shared: replicas of one deployment name the same mount. Every live pull
(queued, running or done) holds a reference on each path it names there — the pull
records *are* the reference counts (``Pull.mounts``, persisted; read through the
``users`` function the engine gives, :meth:`agent.pulls.PullBook.mount_users`), so they
survive a restart — and each mount has a persisted ledger of what this agent created in
it (``agent.mounts.MountLedger``, under ``MOUNT_KEY_PREFIX`` in the node cache's LMDB).
Releasing or failing a pull removes only ledger entries no other live pull names, and
only what the agent created.

Linking, sealing and removing in one mount run under that mount's lock, on the agent's
local I/O pool; the file operations themselves are ``agent/mounts.py``'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from agent import mounts as mountlib
from agent.planner import PullTarget
from cache.node import NodeCache, content_key

log = logging.getLogger(__name__)

MOUNT_KEY_PREFIX = "mount/"

Io = Callable[..., Awaitable[Any]]
# (mount, pull id to leave out) → the paths each other live pull names in the mount.
Users = Callable[[str, str], list[list[str]]]


class MountKeeper:
    """The mounts of one agent: per-mount locks and ledgers; see the module docstring."""

    def __init__(self, node: NodeCache, *, io: Io, users: Users) -> None:
        self.node = node
        self.io = io
        self.users = users
        # One lock per mount: linking, sealing and removing in a mount never interleave.
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, mount: str) -> asyncio.Lock:
        lock = self._locks.get(mount)
        if lock is None:
            lock = self._locks[mount] = asyncio.Lock()
        return lock

    async def _run_locked(self, mount: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the I/O pool holding the mount's lock. A cancelled caller still
        waits for the thread to finish, so the lock never frees while it writes."""
        async with self._lock(mount):
            return await self._finish(self.io(fn, *args))

    @staticmethod
    async def _finish(work: Awaitable[Any]) -> Any:
        fut = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    def _ledger(self, mount: str) -> mountlib.MountLedger:
        return mountlib.MountLedger.from_doc(mount, self.node.meta_get(MOUNT_KEY_PREFIX + mount))

    def _save_ledger(self, ledger: mountlib.MountLedger) -> None:
        if ledger.empty:
            self.node.meta_delete(MOUNT_KEY_PREFIX + ledger.mount)
        else:
            self.node.meta_put(MOUNT_KEY_PREFIX + ledger.mount, ledger.to_doc())

    async def check(self, targets: list[PullTarget]) -> None:
        """Every mount path of ``targets`` may be written (before anything is)."""
        for t in targets:
            if t.mount is None:
                continue
            digests = {f.path: content_key(f) for f in t.files}
            have = self.node.complete_files(set(digests.values()))
            expected = {rel: self.node.file_path(d) for rel, d in digests.items() if d in have}
            await self._run_locked(t.mount, lambda m=t.mount, fs=t.files, e=expected:
                                   mountlib.check_mount_paths(m, [f.path for f in fs],
                                                              ledger=self._ledger(m),
                                                              expected=e))

    async def link(self, mount: str, rel: str, src: Path) -> None:
        """Publish ``src`` (a complete file in the node cache) at ``mount/rel``."""
        await self._run_locked(mount, self._link_locked, mount, rel, src)

    async def seal(self, mount: str) -> None:
        """Make the mount's folders read-only (every file of a pull is in place)."""
        await self._run_locked(mount, self._seal_locked, mount)

    async def release(self, pull_id: str, mounts: dict[str, list[str]]) -> None:
        """Remove what pull ``pull_id`` named in each mount, unless another live pull
        names it too. A mount that cannot be cleaned is logged, not raised: releasing
        goes on with the next."""
        for mount, rels in mounts.items():
            async with self._lock(mount):
                # Users are counted under the lock: a pull that linked anything here
                # registered its paths before, so it is counted.
                users = self.users(mount, pull_id)
                try:
                    await self._finish(self.io(self._release_locked, mount, list(rels),
                                               users))
                except OSError as e:
                    log.warning("releasing mount %s of pull %s: %s", mount, pull_id, e)

    @staticmethod
    def sweep(mounts: dict[str, list[str]]) -> None:
        """Remove temporary names a cross-device copy killed mid-way may have left."""
        for mount, rels in mounts.items():
            mountlib.sweep_copy_leftovers(Path(mount), rels)

    def _link_locked(self, mount: str, rel: str, src: Path) -> None:
        mountlib.link_file(Path(mount), rel, src, self._ledger(mount), self._save_ledger)

    def _seal_locked(self, mount: str) -> None:
        mountlib.seal(Path(mount), self._ledger(mount))

    def _release_locked(self, mount: str, rels: Iterable[str],
                        users: list[list[str]]) -> None:
        kept = {rel for paths in users for rel in paths}
        keep_dirs = {d for rel in kept for d in mountlib.parent_dirs(rel)}
        ledger = self._ledger(mount)
        try:
            mountlib.release(Path(mount), ledger, [r for r in rels if r not in kept],
                             keep_dirs)
        finally:
            self._save_ledger(ledger)
        if users:
            mountlib.seal(Path(mount), ledger)
