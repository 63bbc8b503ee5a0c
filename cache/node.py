"""The node cache: complete, verified files shared by every replica on a node.

One per node, owned by the agent. Layout under ``root``::

    files/<aa>/<hex>     a complete file, verified, read-only, named by its BLAKE3
    partial/<hex>        a file being pulled (preallocated, written chunk by chunk); once
                         complete, a second name of the published file until restart
    index/               LMDB: what is where (below)

The LMDB index has one environment and these tables:

* ``files``   file key → {size, mode, digest, last_use, chunks: [[chunk, offset, length]]}
  (the key is :func:`content_key`: the file digest, a hash of the chunk list)
* ``partials`` file hex → {size, mode, last_use} for files under ``partial/``
* ``journal`` ``<file hex>/<offset as 16 hex>`` → chunk hex: a chunk of a partial file
  whose bytes were written *and verified*; what a restarted agent resumes from
* ``chunks``  chunk hex → {file, offset, length, partial}: where the bytes of a chunk
  already lie on this node, so another file needing it copies it locally
* ``pins``    ``<file hex>/<holder>`` → "" : a live mount (or a running pull) holds it
* ``meta``    free-form records of the agent (pull requests, idempotency keys)

Why LMDB: readers never block the writer, a commit is atomic, and a ``kill -9`` at any
point leaves the last committed state — so the index and the files agree after a crash
by construction: a file is linked into ``files/`` *before* its row is written, and a
``files/`` entry with no row is adopted or removed by :meth:`NodeCache.recover`.

Eviction is least-recently-used over unpinned files (and idle partial files) under a
byte budget; the choice is the cluster cache's pure policy,
:func:`cache.eviction.plan_eviction` (one LRU policy for both tiers), applied to the
node's entries with pins from live mounts and running pulls.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from cache.eviction import Candidate, disk_capacity, plan_eviction
from cache.node_errors import BudgetError, DiskFullError, NodeCacheError
from manifests.digest import Digest
from manifests.manifest import FileEntry, file_digest

log = logging.getLogger(__name__)

FILES_DIR = "files"
PARTIAL_DIR = "partial"
INDEX_DIR = "index"
# The index holds a few hundred bytes a chunk; 4 GiB of address space is room for
# millions of chunks and costs nothing until used (LMDB maps it lazily).
INDEX_MAP_BYTES = 4 * 1024 * 1024 * 1024
INDEX_MAX_DBS = 8
# Disk space a pull leaves free for the index to grow into: a reservation that would eat
# into it evicts first or fails with a clear "disk full", instead of LMDB failing a
# commit half-way through a pull. Rows are ~200 bytes a chunk and LMDB reuses freed
# pages, so this holds the journal of a pull of about ten thousand chunks.
INDEX_HEADROOM_BYTES = 2 * 1024 * 1024
READ_ONLY_MASK = ~0o222 & 0o777


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """What eviction needs to know about one file (complete or partial)."""

    key: str            # file hex
    size: int
    last_use: float
    pinned: bool
    partial: bool = False


@dataclass(frozen=True, slots=True)
class ChunkLocation:
    """Where a chunk's verified bytes lie on this node."""

    file_hex: str
    offset: int
    length: int
    partial: bool


def content_key(entry: FileEntry) -> Digest:
    """The node cache's key for a file: the digest of its chunk list, recomputed.

    A file digest *is* the hash of its chunk list (``manifests.manifest.file_digest``),
    and every chunk is verified as it lands, so the key pins the bytes exactly. It is
    recomputed here rather than taken from the entry, so even an entry built without
    validation can never plant bytes under another file's key.
    """
    return file_digest(entry.chunks)


def _j(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _u(raw: bytes | None) -> Any:
    return None if raw is None else json.loads(raw)


class NodeCache:
    """Files + LMDB index under one directory. Thread-safe (LMDB serialises writers)."""

    def __init__(self, root: str | Path, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("NodeCache budget_bytes must be ≥ 0")
        self.root = Path(os.path.abspath(root))
        self.budget_bytes = budget_bytes
        for d in (self.root, self.root / FILES_DIR, self.root / PARTIAL_DIR,
                  self.root / INDEX_DIR):
            d.mkdir(parents=True, exist_ok=True)
        # sync=False: a process crash (kill -9) loses nothing LMDB committed (the pages
        # are in the kernel); a power loss may lose the last commits, which only costs
        # refetching chunks, because journaled chunks are re-verified on resume.
        self.env = lmdb.open(str(self.root / INDEX_DIR), map_size=INDEX_MAP_BYTES,
                             max_dbs=INDEX_MAX_DBS, sync=False, metasync=False)
        self._files = self.env.open_db(b"files")
        self._partials = self.env.open_db(b"partials")
        self._journal = self.env.open_db(b"journal")
        self._chunks = self.env.open_db(b"chunks")
        self._pins = self.env.open_db(b"pins")
        self._meta = self.env.open_db(b"meta")
        self._lock = threading.Lock()
        # Bytes promised to running pulls but not yet allocated on disk.
        self._reserved: dict[str, int] = {}

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        """A write transaction on the index. The index grows on the same disk as the
        files: a commit refused for space is the same clear "disk full" as a file's
        (bytes, path), never LMDB's bare ``mdb_txn_commit: ...`` (a short write on a
        full disk even reads "Input/output error" there)."""
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except lmdb.MapFullError:
            index = self.root / INDEX_DIR
            raise DiskFullError(
                f"the node cache index {index} is full: it reached its map size of "
                f"{INDEX_MAP_BYTES:,d} bytes; evict or remove the cache directory",
                path=str(index), needed=INDEX_HEADROOM_BYTES) from None
        except lmdb.Error as e:
            index = self.root / INDEX_DIR
            free = self.disk_free_bytes()
            if free < INDEX_HEADROOM_BYTES or "No space" in str(e):
                raise DiskFullError(
                    f"no space on the node's disk for the cache index {index}: it needs up "
                    f"to {INDEX_HEADROOM_BYTES:,d} bytes to grow and {free:,d} are free; "
                    "free space on that disk or lower --budget-bytes",
                    path=str(index), needed=INDEX_HEADROOM_BYTES) from None
            raise NodeCacheError(f"the node cache index {index} could not be written "
                                 f"({e})") from None

    def disk_free_bytes(self) -> int:
        """Bytes the file system under the cache has free for this process."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()

    # -- paths -------------------------------------------------------------------

    def file_path(self, digest: Digest | str) -> Path:
        h = digest.hex if isinstance(digest, Digest) else digest
        return self.root / FILES_DIR / h[:2] / h

    def partial_path(self, digest: Digest | str) -> Path:
        h = digest.hex if isinstance(digest, Digest) else digest
        return self.root / PARTIAL_DIR / h

    # -- lookups -----------------------------------------------------------------

    def has_file(self, digest: Digest) -> bool:
        with self.env.begin() as txn:
            return txn.get(digest.hex.encode(), db=self._files) is not None

    def complete_files(self, digests: Iterable[Digest]) -> set[Digest]:
        with self.env.begin() as txn:
            return {d for d in digests if txn.get(d.hex.encode(), db=self._files) is not None}

    def chunk_locations(self, digests: Iterable[Digest]) -> dict[Digest, ChunkLocation]:
        out: dict[Digest, ChunkLocation] = {}
        with self.env.begin() as txn:
            for d in digests:
                rec = _u(txn.get(d.hex.encode(), db=self._chunks))
                if rec is not None:
                    out[d] = ChunkLocation(rec["file"], rec["offset"], rec["length"],
                                           rec["partial"])
        return out

    def chunk_location(self, digest: Digest) -> ChunkLocation | None:
        return self.chunk_locations([digest]).get(digest)

    def location_path(self, loc: ChunkLocation) -> Path:
        return self.partial_path(loc.file_hex) if loc.partial else self.file_path(loc.file_hex)

    def journal(self, file_digest: Digest) -> dict[int, Digest]:
        """Offsets of the verified chunks of a partial file → their digests."""
        prefix = f"{file_digest.hex}/".encode()
        out: dict[int, Digest] = {}
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._journal)
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    out[int(k[len(prefix):], 16)] = Digest(v.decode())
        return out

    def journals(self, digests: Iterable[Digest]) -> dict[Digest, dict[int, Digest]]:
        return {d: j for d in digests if (j := self.journal(d))}

    def partial_record(self, digest: Digest) -> dict[str, Any] | None:
        with self.env.begin() as txn:
            rec: dict[str, Any] | None = _u(txn.get(digest.hex.encode(), db=self._partials))
            return rec

    # -- writes --------------------------------------------------------------------

    def open_partial(self, entry: FileEntry, now: float) -> tuple[int, bool]:
        """Open (creating and preallocating if needed) the partial file of ``entry``.

        Returns ``(fd, resumed)``; ``resumed`` is True when an earlier partial of the
        right size was found (its journal then says which chunks are already good).
        Raises :class:`DiskFullError` when the disk cannot hold the file.
        """
        fkey = content_key(entry)
        path = self.partial_path(fkey)
        key = fkey.hex.encode()
        rec = self.partial_record(fkey)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_size != entry.size
                               or rec is None):
            self.drop_partial(fkey)
            st = None
        if st is not None:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            with self._writing() as txn:
                txn.put(key, _j({**rec, "last_use": now}), db=self._partials)  # type: ignore[dict-item]
            return fd, True
        # No journal may outlive its partial file: a stale one would claim bytes that
        # are not there.
        self._clear_journal(fkey)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            if entry.size:
                os.posix_fallocate(fd, 0, entry.size)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(
                    f"no space on the node's disk for {entry.size:,d} bytes "
                    f"({entry.path}, {entry.digest.short}) under {self.root}",
                    path=str(path), needed=entry.size) from None
            raise
        with self._writing() as txn:
            txn.put(key, _j({"size": entry.size, "mode": entry.mode, "last_use": now}),
                    db=self._partials)
        return fd, False

    def mark_chunk(self, file_digest: Digest, offset: int, length: int,
                   chunk_digest: Digest) -> None:
        """Journal one verified chunk of a partial file and index it for local reuse."""
        with self._writing() as txn:
            txn.put(f"{file_digest.hex}/{offset:016x}".encode(), chunk_digest.hex.encode(),
                    db=self._journal)
            ck = chunk_digest.hex.encode()
            old = _u(txn.get(ck, db=self._chunks))
            # A location in a complete file is better than one in a partial file.
            if old is None or old["partial"]:
                txn.put(ck, _j({"file": file_digest.hex, "offset": offset, "length": length,
                                "partial": True}), db=self._chunks)

    def unmark_chunk(self, chunk_digest: Digest, loc: ChunkLocation) -> None:
        """Forget a chunk location found bad (its bytes did not verify)."""
        with self._writing() as txn:
            ck = chunk_digest.hex.encode()
            cur = _u(txn.get(ck, db=self._chunks))
            if cur and cur["file"] == loc.file_hex and cur["offset"] == loc.offset:
                txn.delete(ck, db=self._chunks)
            if loc.partial:
                txn.delete(f"{loc.file_hex}/{loc.offset:016x}".encode(), db=self._journal)

    def publish(self, entry: FileEntry, fd: int, now: float) -> Path:
        """fsync a complete, verified partial file and link it into ``files/``.

        Crash-safe in three steps: (1) the partial's row records the finished file
        (its chunk list: an intent to publish), (2) the file appears under ``files/``,
        (3) the index row. A crash after (2) leaves a complete file with no row, which
        :meth:`recover` adopts from the intent, so a verified file is never thrown away.
        """
        os.fchmod(fd, entry.mode & READ_ONLY_MASK)
        os.fsync(fd)
        fkey = content_key(entry)
        record = _file_record(entry, now)
        with self._writing() as txn:
            txn.put(fkey.hex.encode(), _j({**record, "publishing": True}), db=self._partials)
        target = self.file_path(fkey)
        target.parent.mkdir(exist_ok=True)
        # A link, not a rename: the partial name stays valid (same inode, now complete)
        # for a loader that learned it from a chunk event and opens it late. It is
        # removed with the file (eviction) or by recover() at the next start.
        tmp = target.with_name(f".{fkey.hex}.{os.getpid()}.link")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.link(self.partial_path(fkey), tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        self._index_file(fkey, record)
        return target

    def _index_file(self, fkey: Digest, record: dict[str, Any]) -> None:
        h = fkey.hex
        with self._writing() as txn:
            txn.put(h.encode(), _j(record), db=self._files)
            txn.delete(h.encode(), db=self._partials)
            self._clear_journal_txn(txn, fkey)
            for ch, offset, length in record["chunks"]:
                ck = ch.encode()
                old = _u(txn.get(ck, db=self._chunks))
                if old is None or old["partial"] or old["file"] == h:
                    txn.put(ck, _j({"file": h, "offset": offset, "length": length,
                                    "partial": False}), db=self._chunks)

    def touch(self, digests: Iterable[Digest], now: float) -> None:
        with self._writing() as txn:
            for d in digests:
                rec = _u(txn.get(d.hex.encode(), db=self._files))
                if rec is not None:
                    rec["last_use"] = now
                    txn.put(d.hex.encode(), _j(rec), db=self._files)

    def _clear_journal(self, digest: Digest) -> None:
        with self._writing() as txn:
            self._clear_journal_txn(txn, digest)

    def _clear_journal_txn(self, txn: lmdb.Transaction, digest: Digest) -> None:
        prefix = f"{digest.hex}/".encode()
        cur = txn.cursor(db=self._journal)
        chunk_keys: list[bytes] = []
        if cur.set_range(prefix):
            while cur.key().startswith(prefix):
                chunk_keys.append(bytes(cur.value()))
                if not cur.delete():
                    break
        # Chunk rows pointing into this partial file are no longer backed.
        for ck in chunk_keys:
            rec = _u(txn.get(ck, db=self._chunks))
            if rec is not None and rec["partial"] and rec["file"] == digest.hex:
                txn.delete(ck, db=self._chunks)

    def drop_partial(self, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial_path(digest))
        with self._writing() as txn:
            txn.delete(digest.hex.encode(), db=self._partials)
            self._clear_journal_txn(txn, digest)

    def reclaim_partials(self, digests: Iterable[Digest]) -> int:
        """Drop the partial files of ``digests`` that no holder pins (a failed pull's,
        once it unpinned them): their space goes back to the disk now, not at the next
        eviction. Returns how many were dropped."""
        pinned = self.pinned()
        dropped = 0
        for d in digests:
            if d.hex not in pinned and self.partial_record(d) is not None:
                self.drop_partial(d)
                dropped += 1
        return dropped

    # -- pins ----------------------------------------------------------------------

    def pin(self, holder: str, digests: Iterable[Digest]) -> None:
        with self._writing() as txn:
            for d in digests:
                txn.put(f"{d.hex}/{holder}".encode(), b"", db=self._pins)

    def unpin(self, holder: str, digests: Iterable[Digest]) -> None:
        with self._writing() as txn:
            for d in digests:
                txn.delete(f"{d.hex}/{holder}".encode(), db=self._pins)

    def pinned(self) -> set[str]:
        with self.env.begin() as txn:
            return {k.split(b"/", 1)[0].decode() for k, _ in txn.cursor(db=self._pins)}

    def pin_holders(self) -> set[str]:
        with self.env.begin() as txn:
            return {k.split(b"/", 1)[1].decode() for k, _ in txn.cursor(db=self._pins)}

    # -- budget and eviction -------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        pinned = self.pinned()
        out: list[CacheEntry] = []
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self._files):
                rec, h = _u(v), k.decode()
                out.append(CacheEntry(h, rec["size"], rec["last_use"], h in pinned))
            for k, v in txn.cursor(db=self._partials):
                rec, h = _u(v), k.decode()
                out.append(CacheEntry(h, rec["size"], rec["last_use"], h in pinned,
                                      partial=True))
        return out

    def used_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def reserve(self, holder: str, files: Mapping[Digest, int], now: float) -> int:
        """Pin ``files`` for ``holder`` and make room for the ones not on disk yet.

        ``files`` maps each file digest the holder needs to its size. Files already
        complete or partial count as used already; the rest are reserved until the
        holder calls :meth:`release_reservation`. Evicts least recently used unpinned
        files as needed — to stay under the budget, and to fit on the disk when it has
        less room than the budget says. Raises :class:`BudgetError` (and pins nothing)
        when the budget cannot hold them even after evicting everything unpinned, and
        :class:`DiskFullError` (bytes needed, path) when the disk cannot.
        """
        with self._lock:
            self.pin(holder, files)
            entries = self.entries()
            present = {e.key for e in entries}
            need = sum(size for d, size in files.items() if d.hex not in present)
            cached = sum(e.size for e in entries)
            used = cached + sum(v for k, v in self._reserved.items() if k != holder)
            free = self.disk_free_bytes()
            # Whatever the budget says, the disk may hold less: plan against both.
            capacity = disk_capacity(self.budget_bytes, cached_bytes=cached,
                                     disk_free_bytes=free, headroom_bytes=INDEX_HEADROOM_BYTES)
            plan = plan_eviction(
                [Candidate(e.key, e.size, e.last_use, e.pinned) for e in entries],
                used_bytes=used, incoming_bytes=need, budget_bytes=capacity, now=now)
            if not plan.fits:
                self.unpin(holder, files)
                pinned = sum(e.size for e in entries if e.pinned)
                if capacity < self.budget_bytes:
                    raise DiskFullError(
                        f"no space on the node's disk for {need:,d} more bytes under "
                        f"{self.root}: {free:,d} bytes are free there (the index keeps "
                        f"{INDEX_HEADROOM_BYTES:,d}), {pinned:,d} bytes of the cache are "
                        "pinned by live mounts or pulls and nothing else can be evicted; "
                        "free space on that disk or release mounts",
                        path=str(self.root), needed=need)
                raise BudgetError(
                    f"the node cache budget of {self.budget_bytes:,d} bytes cannot hold "
                    f"{need:,d} more bytes: {pinned:,d} bytes are pinned by live mounts or "
                    f"pulls and {sum(self._reserved.values()):,d} reserved by running "
                    "pulls; raise --budget-bytes or release mounts",
                    needed=need, available=max(0, self.budget_bytes - pinned),
                    budget=self.budget_bytes)
            by_key = {e.key: e for e in entries}
            for key in plan.victims:
                self._evict(by_key[key])
            self._reserved[holder] = need
            return need

    def release_reservation(self, holder: str) -> None:
        with self._lock:
            self._reserved.pop(holder, None)

    def _evict(self, e: CacheEntry) -> None:
        log.info("evicting %s (%d bytes, %s)", e.key, e.size,
                 "partial" if e.partial else "complete")
        if e.partial:
            self.drop_partial(Digest(e.key))
            return
        # Row first, then file: a crash in between leaves an orphan file that
        # recover() removes, never a row pointing at nothing.
        with self._writing() as txn:
            rec = _u(txn.get(e.key.encode(), db=self._files))
            txn.delete(e.key.encode(), db=self._files)
            for ch, _, _ in (rec or {}).get("chunks", []):
                loc = _u(txn.get(ch.encode(), db=self._chunks))
                if loc and loc["file"] == e.key:
                    txn.delete(ch.encode(), db=self._chunks)
        for path in (self.file_path(e.key), self.partial_path(e.key)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- agent metadata ------------------------------------------------------------

    def meta_put(self, key: str, doc: Any) -> None:
        with self._writing() as txn:
            txn.put(key.encode(), _j(doc), db=self._meta)

    def meta_get(self, key: str) -> Any:
        with self.env.begin() as txn:
            return _u(txn.get(key.encode(), db=self._meta))

    def meta_delete(self, key: str) -> None:
        with self._writing() as txn:
            txn.delete(key.encode(), db=self._meta)

    def meta_items(self, prefix: str) -> Iterator[tuple[str, Any]]:
        p = prefix.encode()
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._meta)
            items = []
            if cur.set_range(p):
                for k, v in cur:
                    if not k.startswith(p):
                        break
                    items.append((k.decode(), _u(v)))
        yield from items

    # -- consistency -----------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Make files and index agree after a crash; returns counts of what was fixed.

        * a file under ``files/`` with no row (crash between link and index): adopted
          from its partial's publish intent (see :meth:`publish`); without an intent
          (not written by this code) it is removed and a pull will bring it back
        * a row whose file is missing: row and its chunk locations dropped
        * a partial file with no ``partials`` row, or the reverse: dropped
        """
        fixed = {"orphan_files": 0, "missing_files": 0, "orphan_partials": 0,
                 "adopted_files": 0}
        with self.env.begin() as txn:
            rows = {k.decode() for k, _ in txn.cursor(db=self._files)}
            intents = {k.decode(): rec for k, v in txn.cursor(db=self._partials)
                       if (rec := _u(v)).get("publishing")}
        on_disk: set[str] = set()
        for sub in (self.root / FILES_DIR).iterdir():
            if sub.is_dir():
                for p in sub.iterdir():
                    if p.name.startswith("."):
                        p.unlink(missing_ok=True)  # a link interrupted by a crash
                    else:
                        on_disk.add(p.name)
        for h in on_disk - rows:
            intent = intents.get(h)
            path = self.file_path(h)
            if intent is not None and path.stat().st_size == intent["size"]:
                record = {k: v for k, v in intent.items() if k != "publishing"}
                self._index_file(Digest(h), record)
                fixed["adopted_files"] += 1
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fixed["orphan_files"] += 1
        with self.env.begin() as txn:
            prow = {k.decode() for k, _ in txn.cursor(db=self._partials)}
        for h in rows - on_disk:
            self._evict(CacheEntry(h, 0, 0.0, False))
            fixed["missing_files"] += 1
        partial_disk = {p.name for p in (self.root / PARTIAL_DIR).iterdir()}
        with self.env.begin() as txn:
            rows = {k.decode() for k, _ in txn.cursor(db=self._files)}
        for h in (partial_disk - prow) & rows:
            # The partial name of a published file, kept for late readers: not an orphan.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / PARTIAL_DIR / h)
        partial_disk -= rows
        for h in (partial_disk ^ prow):
            try:
                d = Digest(h)
            except ValueError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / PARTIAL_DIR / h)
                continue
            self.drop_partial(d)
            fixed["orphan_partials"] += 1
        return fixed

    def stats(self) -> dict[str, int]:
        entries = self.entries()
        return {"files": sum(1 for e in entries if not e.partial),
                "partial_files": sum(1 for e in entries if e.partial),
                "bytes_used": sum(e.size for e in entries),
                "bytes_pinned": sum(e.size for e in entries if e.pinned),
                "budget_bytes": self.budget_bytes}


def _file_record(entry: FileEntry, now: float) -> dict[str, Any]:
    return {"size": entry.size, "mode": entry.mode, "last_use": now,
            "digest": str(entry.digest),
            "chunks": [[c.digest.hex, c.offset, c.length] for c in entry.chunks]}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def now_s() -> float:
    """Wall-clock seconds, the unit of ``last_use`` (comparable across restarts)."""
    return time.time()
