"""The pull engine: resolves requests, plans, fetches and writes, publishes, mounts.

One :class:`Engine` per agent process (the daemon's, or an in-process one for a
standalone ``bdn pull``). It wires together the parts, each in its own module, and
drives a pull through them:

* ``agent/pulls.py`` — the pull records (:class:`Pull`, :class:`PullRequest`), their
  idempotency keys, persistence in the node cache's LMDB and restore after a restart;
* ``agent/filejobs.py`` — one file job per file digest and one fetch per chunk digest
  node-wide, the fetch pool, the bytes-in-flight cap and answer accounting;
* ``agent/mountkeeper.py`` — shared mounts: reference counts (the pull records) and
  ledgers, linking, sealing and releasing under per-mount locks;
* ``agent/events.py`` — the typed records a pull emits, and their wire form;
* ``agent/metrics.py`` — the counters and ``/metrics`` families.

What stays here is what needs all of them: a pull's course (resolve → check mounts →
plan → reserve → link cached files, write the rest → seal; on failure, undo), the
translation of file jobs' progress into each pull's events, release, and the
node-wide plumbing (the local I/O pool, the ring client, holder announcements).

Before its ``file`` event a file is readable only through ``disk_path`` (the partial
file in the node cache, opened read-only); ``chunk`` events say which ranges of it are
verified. When complete, the file is *linked* (not renamed) into the node cache's store,
so the partial path stays valid — same inode, now complete — until the file is evicted
or the agent restarts: a loader may open it late. Events sent after publication carry
the store path. After ``file``, the file is at ``mount/path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent import events
from agent import metrics as agent_metrics
from agent.errors import DiskFullError, PullError
from agent.filejobs import ByteSemaphore, FileJob, FileJobs, spread_for_sharing
from agent.mountkeeper import MountKeeper
from agent.options import AgentOptions
from agent.planner import PlanOptions, PullPlan, PullTarget, plan_pull
from agent.pulls import (
    TIERS,
    Pull,
    PullBook,
    PullRequest,
    TargetSpec,
    check_idempotency_key,
    parse_request,
)
from agent.resolve import select_files
from bdn import metrics as prom
from bdn.errors import BdnError
from bdn.store import BlobStore
from cache.client import RingClient, RingClientOptions
from cache.node import NodeCache, content_key, now_s
from cache.suspicion import Suspicion
from manifests.digest import Digest
from manifests.manifest import Chunk, FileEntry, Manifest, parse_manifest

# Callers import these from here (the daemon, the CLI, tests, bench).
__all__ = ["ByteSemaphore", "Engine", "FileJob", "Pull", "PullRequest", "TargetSpec",
           "parse_request", "spread_for_sharing"]

log = logging.getLogger(__name__)

LOCAL_IO_THREADS = 4
PEER_REFRESH_S = 5.0
# Verified chunks are announced to their owning pods in batches this often (sharing on).
HOLDERS_ANNOUNCE_S = 0.2
# Chunks still being received are announced again this often, so their short-lived
# "receiving" records (cache/tracker.py RECEIVING_TTL_S, 5 s) outlive a long receive.
RECEIVING_RENEW_S = 2.0


class Engine:
    """Node-wide pull machinery; see the module docstring. Create inside a running loop."""

    def __init__(self, options: AgentOptions, *, node: NodeCache | None = None,
                 store: BlobStore | None = None) -> None:
        self.options = options
        self.node = node or NodeCache(options.cache_dir, options.budget_bytes)
        self.store = store if store is not None else (
            BlobStore(options.store_url) if options.store_url else None)
        # One suspicion for chunks, manifests and refs: a pod that hung on one is
        # passed over for the others.
        self.suspicion = Suspicion(options.suspect_s)
        self.ring = _make_ring_client(options, self.store, self.suspicion)
        self.io_pool = ThreadPoolExecutor(LOCAL_IO_THREADS, thread_name_prefix="bdn-io")
        self.counters: dict[str, int] = agent_metrics.new_counters()
        self.book = PullBook(self.node)
        self.pulls: dict[str, Pull] = self.book.pulls
        self.files = FileJobs(options, self.node, self.store, ring=self.ring,
                              suspicion=self.suspicion, counters=self.counters,
                              io=self.io, on_held=self.note_held)
        self.mount_keeper = MountKeeper(self.node, io=self.io, users=self.book.mount_users)
        # This agent's own registry (tests run several agents in one process).
        self.registry = prom.service_registry()
        self.registry.register(prom.StateCollector(self.collect_metrics))
        self._lock = asyncio.Lock()
        self._dns_task: asyncio.Task[None] | None = None
        if self.ring is not None and options.peers_dns:
            self._dns_task = asyncio.create_task(self._refresh_peers())
        # Node-to-node sharing: chunks verified here, not yet announced to their pods.
        self._held: list[Digest] = []
        self._held_event = asyncio.Event()
        self._announce_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        if self.ring is not None and options.peer_advertise:
            self._announce_task = asyncio.create_task(self._announce_holders())
            self._renew_task = asyncio.create_task(self._renew_receiving())

    def note_held(self, digest: Digest) -> None:
        """A chunk is verified in the node cache: announce it (sharing on)."""
        if self._announce_task is not None:
            self._held.append(digest)
            self._held_event.set()

    async def _announce_holders(self) -> None:
        """Announce verified chunks to their owning pods, batched every
        ``HOLDERS_ANNOUNCE_S`` (so a pull of 1000 chunks is a handful of requests)."""
        assert self.ring is not None and self.options.peer_advertise
        while True:
            await self._held_event.wait()
            self._held_event.clear()
            batch, self._held = self._held, []
            with contextlib.suppress(Exception):
                await self.ring.announce_holders(self.options.peer_advertise, batch)
            await asyncio.sleep(HOLDERS_ANNOUNCE_S)  # batching interval, not a wait-for

    async def _renew_receiving(self) -> None:
        """Renew the "receiving" records of chunks in flight here for longer than one
        period (a receive that progresses; a stalled one is abandoned by the fetcher
        and then drops out of ``inflight``)."""
        assert self.ring is not None and self.options.peer_advertise
        seen: set[Digest] = set()
        while True:
            await asyncio.sleep(RECEIVING_RENEW_S)  # a renewal period, not a wait-for
            now = set(self.files.inflight)
            if now & seen:
                with contextlib.suppress(Exception):
                    await self.ring.announce_holders(self.options.peer_advertise,
                                                     sorted(now & seen, key=str),
                                                     receiving=True)
            seen = now

    async def _refresh_peers(self) -> None:
        """Keep the ring's DNS peers fresh; fetch threads read ``ring.owners`` directly."""
        while True:
            with contextlib.suppress(Exception):
                await self.ring.refresh_peers()
            await asyncio.sleep(PEER_REFRESH_S)

    # -- plumbing ------------------------------------------------------------------------

    async def io(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.io_pool, lambda: fn(*args, **kw))

    async def close(self) -> None:
        if self._dns_task is not None:
            self._dns_task.cancel()
        if self._announce_task is not None:
            self._announce_task.cancel()
        if self._renew_task is not None:
            self._renew_task.cancel()
        self.files.cancel()
        for pull in list(self.pulls.values()):
            if pull.task is not None and not pull.task.done():
                pull.task.cancel()
                with contextlib.suppress(BaseException):
                    await pull.task
        self.files.close()  # chunks waiting out a backoff give up now
        if self.ring is not None:
            with contextlib.suppress(Exception):
                await self.ring.close()
        self.files.shutdown_pool()
        self.io_pool.shutdown(wait=True, cancel_futures=True)
        self.node.close()

    # -- manifests -----------------------------------------------------------------------

    async def resolve(self, name: str) -> tuple[Digest, Manifest]:
        if self.ring is not None:
            try:
                if name.startswith("b3:"):
                    digest = Digest.parse(name)
                else:
                    digest = Digest.parse(str(await self.ring.resolve_ref(name)))
                data = await self.ring.get_manifest_bytes(digest)
                manifest = parse_manifest(data, expect=digest)
                self.ring.remember(digest, manifest)
                return digest, manifest
            except BdnError:
                if self.store is None or self.options.strict:
                    raise
        if self.store is None:
            raise PullError(f"cannot resolve {name}: no blob store and no cluster cache "
                            "client")
        store = self.store
        result: tuple[Digest, Manifest] = await self.io(store.resolve, name)
        if self.ring is not None:
            self.ring.remember(*result)
        return result

    # -- pulls ---------------------------------------------------------------------------

    def restore(self) -> list[Pull]:
        """Load persisted pulls; unfinished ones are started again (resume after crash)."""
        self.node.recover()
        resumed = []
        for pull in self.book.load():
            # A cross-device copy killed mid-way may have left a temporary name.
            self.mount_keeper.sweep(pull.mounts)
            if pull.state in ("queued", "running"):
                self._start(pull)
                resumed.append(pull)
            elif pull.state == "done":
                # A loader subscribing after a restart still learns every file is there.
                for mount, rels in pull.mounts.items():
                    for rel in rels:
                        pull.emit(events.FilePublished(path=rel, mount=mount, restored=True))
                pull.emit(events.Done(restored=True))
            elif pull.state == "failed":
                pull.emit(events.Error(message=pull.error or "failed"))
        return resumed

    async def submit(self, request: PullRequest, key: str | None = None, *,
                     owner_uid: int | None = None) -> tuple[Pull, bool]:
        """Start a pull (or return the one started with ``key``); returns (pull, created).

        ``owner_uid``: the caller's uid when the API knows it (recorded on a new pull, so
        the daemon hands a re-posting caller the release token only if it is the owner).
        """
        check_idempotency_key(key)
        async with self._lock:
            if key is not None:
                pull = self.book.by_key(key, request)
                if pull is not None:
                    if pull.state == "failed":
                        self._start(pull)  # retrying a failed pull is the point of re-posting
                    return pull, False
            pull = self.book.create(request, key, owner_uid)
            self._start(pull)
            return pull, True

    def _persist(self, pull: Pull) -> None:
        self.book.persist(pull)

    def _start(self, pull: Pull) -> None:
        pull.state, pull.error, pull.finished = "queued", None, None
        pull.events = []
        pull.bytes_by_tier = dict.fromkeys(TIERS, 0)
        pull.bytes_done = pull.files_done = 0
        pull.started = time.monotonic()
        self.counters["pulls_started"] += 1
        pull.task = asyncio.create_task(self._run(pull), name=f"pull {pull.id}")

    async def wait(self, pull: Pull) -> None:
        if pull.task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(pull.task)

    async def _run(self, pull: Pull) -> None:
        pull.state = "running"
        self._persist(pull)
        try:
            await self._execute(pull)
        except asyncio.CancelledError:
            pull.finished = time.monotonic()
            raise
        except Exception as e:
            msg = str(e) if isinstance(e, BdnError) else f"{type(e).__name__}: {e}"
            log.warning("pull %s failed: %s", pull.id, msg)
            pull.state, pull.error, pull.finished = "failed", msg, time.monotonic()
            self.counters["pulls_failed"] += 1
            await self.mount_keeper.release(pull.id, pull.mounts)
            self.node.unpin(pull.id, [Digest(h) for h in pull.files])
            self.node.release_reservation(pull.id)
            if isinstance(e, DiskFullError):
                # Partial files of a pull the disk could not hold only hold the disk.
                self.node.reclaim_partials(Digest(h) for h in pull.files
                                           if Digest(h) not in self.files.running)
            self._persist(pull)
            pull.emit(events.Error(message=msg, error=type(e).__name__))
            return
        pull.state, pull.finished = "done", time.monotonic()
        self.counters["pulls_done"] += 1
        if not pull.mounts:
            # A pre-warm pull holds nothing once the node cache has the files.
            self.node.unpin(pull.id, [Digest(h) for h in pull.files])
        self.node.release_reservation(pull.id)
        self._persist(pull)
        pull.emit(events.Done(bytes_by_tier=dict(pull.bytes_by_tier),
                              seconds=round(pull.finished - pull.started, 3)))

    async def _execute(self, pull: Pull) -> None:
        # 1. Resolve every target to files.
        targets: list[PullTarget] = []
        pull.manifests = []
        for spec in pull.request.targets:
            digest, manifest = await self.resolve(spec.name)
            pull.manifests.append(str(digest))
            files = select_files(manifest, spec.allow, spec.ignore)
            if not files:
                raise PullError(f"{spec.name} has no files matching allow={list(spec.allow)} "
                                f"ignore={list(spec.ignore)}", pull_id=pull.id)
            targets.append(PullTarget(spec.mount, files))
        # 2. Every mount path is checked before anything is written anywhere.
        await self.mount_keeper.check(targets)
        # 3. Plan against what the node has.
        digests = {content_key(f) for t in targets for f in t.files}
        chunk_digests = {c.digest for t in targets for f in t.files for c in f.chunks}
        plan = plan_pull(targets, have_files=self.node.complete_files(digests),
                         chunk_locations=self.node.chunk_locations(chunk_digests),
                         journals=self.node.journals(digests),
                         options=PlanOptions(order=pull.request.order))
        # 4. Room under the budget (pins every file of the pull; may evict others).
        pull.files = sorted(d.hex for d in plan.sizes)
        pull.mounts = {}
        for link in plan.links:
            pull.mounts.setdefault(link.mount, []).append(link.path)
        self._persist(pull)
        await self.io(self.node.reserve, pull.id, dict(plan.sizes), now_s())
        pull.bytes_total = sum(e.size for t in targets for e in t.files)
        pull.files_total = sum(len(t.files) for t in targets)
        pull.emit(self._plan_event(plan, targets))
        # 5. Files: cached ones are linked at once; the rest are written, in order.
        by_digest: dict[Digest, list[tuple[str | None, FileEntry]]] = {}
        for t in targets:
            for f in t.files:
                by_digest.setdefault(content_key(f), []).append((t.mount, f))
        self.node.touch([content_key(e) for e in plan.cached], now_s())
        for entry in plan.cached:
            src = self.node.file_path(content_key(entry))
            for mount, f in by_digest[content_key(entry)]:
                pull.bytes_by_tier["node"] += f.size
                self.counters["bytes_node"] += f.size
                await self._publish_in_mount(pull, mount, f, src)
        waits: list[asyncio.Task[None]] = []
        for fp in plan.files:
            job = self.files.job(fp)
            self._listen(pull, job, by_digest[fp.digest])
            waits.append(asyncio.create_task(self._finish_file(pull, job,
                                                               by_digest[fp.digest])))
            await job.issued.wait()
        try:
            await asyncio.gather(*waits)
        except BaseException:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            raise
        for mount in pull.mounts:
            await self.mount_keeper.seal(mount)

    @staticmethod
    def _plan_event(plan: PullPlan, targets: list[PullTarget]) -> events.Plan:
        by = plan.bytes_by_source()
        return events.Plan(
            bytes=sum(f.size for t in targets for f in t.files),
            files=tuple(events.PlannedFile(path=f.path, mount=t.mount, size=f.size,
                                           digest=str(f.digest))
                        for t in targets for f in t.files),
            bytes_cached=by["cached"], bytes_resumed=by["done"], bytes_local=by["local"],
            bytes_network=by["network"], bytes_duplicate=by["dup"])

    def _listen(self, pull: Pull, job: FileJob,
                uses: list[tuple[str | None, FileEntry]]) -> None:
        def on_start(partial: str) -> None:
            for mount, f in uses:
                pull.emit(events.FileStarted(path=f.path, mount=mount, size=f.size,
                                             partial_path=partial, disk_path=partial))

        def on_chunk(chunk: Chunk, tier: str) -> None:
            if pull.state != "running":
                return
            for i, (mount, f) in enumerate(uses):
                # A duplicate of a file is a hardlink: its bytes come from the node.
                pull.bytes_by_tier[tier if i == 0 else "node"] += chunk.length
                pull.bytes_done += chunk.length
                pull.emit(events.ChunkVerified(
                    path=f.path, mount=mount, offset=chunk.offset, length=chunk.length,
                    size=f.size, tier=tier, disk_path=job.disk_path))
        job.subscribe(on_chunk, on_start)

    async def _finish_file(self, pull: Pull, job: FileJob,
                           uses: list[tuple[str | None, FileEntry]]) -> None:
        path = await asyncio.shield(job.future)
        for mount, f in uses:
            await self._publish_in_mount(pull, mount, f, path, count_bytes=False)

    async def _publish_in_mount(self, pull: Pull, mount: str | None, f: FileEntry,
                                src: Path, *, count_bytes: bool = True) -> None:
        if mount is not None:
            await self.mount_keeper.link(mount, f.path, src)
        pull.files_done += 1
        if count_bytes:
            pull.bytes_done += f.size
        pull.emit(events.FilePublished(path=f.path, mount=mount, digest=str(f.digest),
                                       size=f.size))

    async def release(self, pull_id: str) -> Pull:
        """Release a pull's mounts and pins (``DELETE /v1/pulls/{id}``)."""
        pull = self.pulls.get(pull_id)
        if pull is None:
            raise KeyError(pull_id)
        if pull.task is not None and not pull.task.done():
            pull.task.cancel()
            with contextlib.suppress(BaseException):
                await pull.task
        await self.mount_keeper.release(pull.id, pull.mounts)
        self.node.unpin(pull.id, [Digest(h) for h in pull.files])
        self.node.release_reservation(pull.id)
        pull.state = "released"
        pull.finished = pull.finished or time.monotonic()
        self._persist(pull)
        self.book.forget_key(pull)
        if not pull.ended:
            pull.emit(events.Error(message="the pull was released"))
        return pull

    def close_streams(self) -> None:
        """End every event stream (the agent is stopping; clients reconnect later)."""
        for pull in self.pulls.values():
            pull.closed = True
            pull._changed.set()

    def collect_metrics(self) -> Iterator[prom.Metric]:
        """The agent's families (``/metrics``), read from its live state."""
        return agent_metrics.collect(self.counters, self.files.buffers, self.node,
                                     self.book.states())


def _make_ring_client(options: AgentOptions, store: BlobStore | None,
                      suspicion: Suspicion) -> RingClient | None:
    """The one ring (peer list, DNS refresh, placement) when cache peers are set.

    Manifests and refs are asked with the chunks' deadlines: a hung pod costs a
    first-byte deadline (the read timeout of a small answer) before the next is asked.
    """
    if not options.peers and not options.peers_dns:
        return None
    ring_options = RingClientOptions(
        peers=options.peers, dns_name=options.peers_dns,
        dns_port=options.peers_dns_port, strict_origin=options.strict,
        connect_timeout_s=options.connect_timeout_s,
        read_timeout_s=options.first_byte_timeout_s, retry=options.retry)
    return RingClient(ring_options, store, suspicion=suspicion)
