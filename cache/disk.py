"""The cluster cache's disk store: object files in sharded folders, an LMDB index.

Layout under the cache folder::

    objects/<aa>/<bb>/<hex>     complete, verified objects (decoded bytes, so any range
                                can be sent with sendfile)
    partial/<hex>.<token>       fills in progress; never served as complete
    index/                      LMDB: hex → (size, last access, state)
    lock                        flock: one process per cache folder

Why it is shaped so:

- **Only verified bytes get a final name.** A fill writes into ``partial/``, is verified
  against its digest, then renamed into ``objects/``; the index records ``filling`` before
  the first byte and ``complete`` after the rename. On restart everything in ``partial/``
  and every ``filling`` entry is discarded, and a ``complete`` entry whose file is
  missing or has the wrong size is dropped: a ``kill -9`` mid-fill can never surface a
  partial object as complete. Files under ``objects/`` that the index does not know are
  removed (a crash between rename and index commit).
- **The budget counts reservations.** A fill reserves its full size before it starts, and
  room is made first (the pure policy in :mod:`cache.eviction`), so the bytes on disk
  never exceed the budget, even with fills in flight. An object that cannot fit (larger
  than the budget, or too much pinned) gets no slot: the server serves it from memory
  without keeping it.
- **Readers pin.** Any request serving an object pins its digest; pinned objects are
  never eviction victims, so an object being read is not deleted under its reader.
  Readers in *other* processes (the hit workers of :mod:`cache.workers`, with
  ``shared_readers``) pin by holding a shared ``flock`` on the object file they opened:
  before removing a victim this process takes an exclusive ``flock`` on it (non-blocking;
  a victim someone reads is skipped and the plan is made again) and holds it across the
  unlink, so a reader either got its shared lock first (and the object stays) or finds
  the lock taken or the file unlinked (and asks this process instead). Those processes
  only ever open files under ``objects/`` for reading: they never touch the index, the
  partial files or the folder lock.
- **Access times are batched.** Every hit updates the in-memory LRU clock; the index is
  written in one transaction at most every ``ACCESS_FLUSH_S`` (and at close), so a hit
  costs no disk write. After a crash the LRU order is at most that stale.

The in-memory view is authoritative while the process runs; all methods are called from
the server's event loop thread (each is a few syscalls), except that a fill's thread
writes into the partial file it was handed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb

from cache.errors import DiskStoreError
from cache.eviction import Candidate, plan_eviction
from manifests.digest import Digest

log = logging.getLogger(__name__)

OBJECTS_DIR = "objects"
PARTIAL_DIR = "partial"
INDEX_DIR = "index"
LOCK_FILE = "lock"
STATE_FILLING = 1
STATE_COMPLETE = 2
# LMDB reserves address space, not disk; 8 GiB covers ~5·10^7 entries.
INDEX_MAP_BYTES = 8 * 1024 * 1024 * 1024
ACCESS_FLUSH_S = 5.0
_RECORD = struct.Struct("<QdB")  # size, last access (unix seconds), state


def object_relpath(hex_: str) -> str:
    """A complete object's file under ``objects/`` (also read by the worker processes
    of :mod:`cache.worker`, which know no more of this layout than this)."""
    return f"{hex_[:2]}/{hex_[2:4]}/{hex_}"


@dataclass(frozen=True)
class DiskOptions:
    """``budget_bytes``: most object bytes kept on disk. ``fsync``: sync each object file
    and the index before a fill counts as complete (survives power loss, not only a
    process crash; costs a flush per fill). ``shared_readers``: other processes read
    objects under a shared ``flock``, which eviction respects (see module docstring)."""

    budget_bytes: int
    fsync: bool = False
    shared_readers: bool = False

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ValueError("DiskOptions.budget_bytes must be ≥ 0")


@dataclass
class _Entry:
    size: int
    last_access: float
    state: int


@dataclass
class FillSlot:
    """Where one fill writes: an open partial file, with its full size reserved."""

    digest: Digest
    size: int
    path: Path
    fd: int


@dataclass(frozen=True)
class DiskUsage:
    used_bytes: int
    reserved_bytes: int
    objects: int
    budget_bytes: int


class DiskStore:
    """Complete objects on disk under a byte budget (see module docstring)."""

    def __init__(self, root: str | Path, options: DiskOptions) -> None:
        self.root = Path(root).expanduser().resolve()
        self.options = options
        self._objects = self.root / OBJECTS_DIR
        self._partial = self.root / PARTIAL_DIR
        self._objects_str = str(self._objects)
        try:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._partial.mkdir(parents=True, exist_ok=True)
            # One process per folder: a second one would discard the first's fills as
            # "partial" on start. The kernel drops the lock when a process dies.
            self._lock_fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                raise DiskStoreError(f"cache folder {self.root} is in use by another "
                                     "process", url=str(self.root)) from None
            self._env = lmdb.open(str(self.root / INDEX_DIR), map_size=INDEX_MAP_BYTES,
                                  subdir=True, sync=options.fsync, metasync=options.fsync,
                                  max_dbs=0, lock=True)
        except (OSError, lmdb.Error) as e:
            raise DiskStoreError(f"cannot open cache folder {self.root}: {e}",
                                 url=str(self.root)) from e
        self._entries: dict[str, _Entry] = {}
        self._pins: dict[str, int] = {}
        self._reserved = 0
        self._used = 0
        self._dirty_access: set[str] = set()
        self._last_flush = time.monotonic()
        self._made_dirs: set[str] = set()
        self.evictions = 0
        self.evicted_bytes = 0
        self.recovered = self._recover()

    # -- paths ---------------------------------------------------------------------

    def object_path(self, digest: Digest) -> Path:
        return Path(self.object_file(digest))

    def object_file(self, digest: Digest) -> str:
        """The object's file name as a string (the hot path: no ``Path`` objects)."""
        return self._object_file(digest.hex)

    def _object_file(self, hex_: str) -> str:
        return f"{self._objects_str}/{object_relpath(hex_)}"

    # -- recovery ------------------------------------------------------------------

    def _recover(self) -> dict[str, int]:
        """Keep complete objects, drop partial ones (see module docstring)."""
        kept = dropped = 0
        for name in os.listdir(self._partial):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._partial / name)
                dropped += 1
        stale: list[bytes] = []
        with self._env.begin() as txn:
            for key, value in txn.cursor():
                hex_ = key.decode()
                try:
                    size, last, state = _RECORD.unpack(value)
                    digest = Digest(hex_)
                except (struct.error, ValueError):
                    stale.append(key)
                    continue
                path = self.object_path(digest)
                try:
                    ok = state == STATE_COMPLETE and os.stat(path).st_size == size
                except FileNotFoundError:
                    ok = False
                if ok:
                    self._entries[hex_] = _Entry(size, last, STATE_COMPLETE)
                    self._used += size
                    kept += 1
                else:
                    stale.append(key)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    dropped += 1
        if stale:
            with self._env.begin(write=True) as txn:
                for key in stale:
                    txn.delete(key)
        for dirpath, _, names in os.walk(self._objects):
            for name in names:
                if name not in self._entries:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                    dropped += 1
        if self._used > self.options.budget_bytes:
            self._make_room(0, now=time.time())
        if kept or dropped:
            log.info("cache %s: kept %d complete object(s), discarded %d partial/unknown",
                     self.root, kept, dropped)
        return {"kept": kept, "dropped": dropped}

    # -- reads ---------------------------------------------------------------------

    def lookup(self, digest: Digest) -> str | None:
        """The file of a complete object, or None."""
        e = self._entries.get(digest.hex)
        if e is None or e.state != STATE_COMPLETE:
            return None
        return self.object_file(digest)

    def size_of(self, digest: Digest) -> int | None:
        e = self._entries.get(digest.hex)
        return e.size if e is not None and e.state == STATE_COMPLETE else None

    def touch(self, digest: Digest, now: float | None = None) -> None:
        e = self._entries.get(digest.hex)
        if e is None:
            return
        e.last_access = time.time() if now is None else now
        self._dirty_access.add(digest.hex)
        if time.monotonic() - self._last_flush >= ACCESS_FLUSH_S:
            self.flush()

    def note_access(self, digest: Digest, at: float) -> None:
        """An access seen elsewhere at ``at`` (unix seconds), reported late: the LRU
        clock only moves forward."""
        e = self._entries.get(digest.hex)
        if e is None or e.state != STATE_COMPLETE or at <= e.last_access:
            return
        e.last_access = at
        self._dirty_access.add(digest.hex)

    def pin(self, digest: Digest) -> None:
        self._pins[digest.hex] = self._pins.get(digest.hex, 0) + 1

    def unpin(self, digest: Digest) -> None:
        n = self._pins.get(digest.hex, 0) - 1
        if n > 0:
            self._pins[digest.hex] = n
        else:
            self._pins.pop(digest.hex, None)

    def pinned(self, digest: Digest) -> bool:
        return digest.hex in self._pins

    def usage(self) -> DiskUsage:
        complete = sum(1 for e in self._entries.values() if e.state == STATE_COMPLETE)
        return DiskUsage(self._used, self._reserved, complete, self.options.budget_bytes)

    # -- fills ---------------------------------------------------------------------

    def begin_fill(self, digest: Digest, size: int, now: float | None = None
                   ) -> FillSlot | None:
        """Reserve ``size`` bytes (evicting LRU objects) and open a partial file.

        None when the object cannot be kept (see :mod:`cache.eviction`).
        """
        if digest.hex in self._entries:
            raise DiskStoreError(f"object {digest} is already cached or filling",
                                 digest=str(digest), url=str(self.root))
        now = time.time() if now is None else now
        if not self._make_room(size, now=now):
            return None
        path = self._partial / f"{digest.hex}.{secrets.token_hex(4)}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise DiskStoreError(f"cannot create partial file for {digest} in {self.root}: "
                                 f"{e}", digest=str(digest), url=str(self.root)) from e
        self._entries[digest.hex] = _Entry(size, now, STATE_FILLING)
        self._reserved += size
        self._put(digest.hex, self._entries[digest.hex])
        return FillSlot(digest, size, path, fd)

    def commit_fill(self, slot: FillSlot, now: float | None = None) -> Path:
        """Make a verified fill a complete object (rename, then index)."""
        final = self.object_path(slot.digest)
        try:
            if self.options.fsync:
                os.fsync(slot.fd)
            os.close(slot.fd)
            slot.fd = -1
            parent = str(final.parent)
            if parent not in self._made_dirs:
                os.makedirs(parent, exist_ok=True)
                self._made_dirs.add(parent)
            os.replace(slot.path, final)
        except OSError as e:
            self.abort_fill(slot)
            raise DiskStoreError(f"cannot store object {slot.digest} in {self.root}: {e}",
                                 digest=str(slot.digest), url=str(self.root)) from e
        e = self._entries[slot.digest.hex]
        e.state = STATE_COMPLETE
        e.last_access = time.time() if now is None else now
        self._reserved -= slot.size
        self._used += slot.size
        self._put(slot.digest.hex, e)
        return final

    def abort_fill(self, slot: FillSlot) -> None:
        """Forget a failed fill: its partial file and reservation go."""
        if slot.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(slot.fd)
            slot.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.path)
        e = self._entries.get(slot.digest.hex)
        if e is not None and e.state == STATE_FILLING:
            del self._entries[slot.digest.hex]
            self._reserved -= slot.size
            self._delete_keys([slot.digest.hex])

    # -- removal -------------------------------------------------------------------

    def drop(self, digest: Digest) -> bool:
        """Remove a complete object now (a bad copy), pinned or not.

        Readers holding the file open keep their (bad) bytes; nobody new gets them.
        """
        e = self._entries.get(digest.hex)
        if e is None or e.state != STATE_COMPLETE:
            return False
        self._remove([digest.hex])
        return True

    def _make_room(self, incoming: int, *, now: float) -> bool:
        busy: set[str] = set()  # being read by another process (shared flock)
        while True:
            candidates = [Candidate(k, e.size, e.last_access, k in self._pins or k in busy)
                          for k, e in self._entries.items() if e.state == STATE_COMPLETE]
            plan = plan_eviction(candidates, used_bytes=self._used + self._reserved,
                                 incoming_bytes=incoming,
                                 budget_bytes=self.options.budget_bytes, now=now)
            if not plan.victims:
                return plan.fits
            locks = self._lock_victims(plan.victims, busy)
            try:
                if any(k in busy for k in plan.victims):
                    continue  # plan again without what others are reading
                self._remove(list(plan.victims))
            finally:
                for fd in locks:
                    os.close(fd)  # after the unlink: see module docstring
            self.evictions += len(plan.victims)
            self.evicted_bytes += plan.freed_bytes
            return plan.fits

    def _lock_victims(self, victims: tuple[str, ...], busy: set[str]) -> list[int]:
        """Exclusive ``flock`` on each victim's file (``shared_readers`` only); the
        victims another process reads are added to ``busy``. Returns the lock fds."""
        if not self.options.shared_readers:
            return []
        fds: list[int] = []
        for k in victims:
            try:
                fd = os.open(self._object_file(k), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                busy.add(k)
                continue
            fds.append(fd)
        return fds

    def _remove(self, keys: list[str]) -> None:
        for k in keys:
            e = self._entries.pop(k)
            self._used -= e.size
            self._dirty_access.discard(k)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.object_file(Digest(k)))
        self._delete_keys(keys)

    # -- index ---------------------------------------------------------------------

    def _put(self, key: str, e: _Entry) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(key.encode(), _RECORD.pack(e.size, e.last_access, e.state))
        self._dirty_access.discard(key)

    def _delete_keys(self, keys: list[str]) -> None:
        with self._env.begin(write=True) as txn:
            for k in keys:
                txn.delete(k.encode())

    def flush(self) -> None:
        """Write batched access times to the index."""
        self._last_flush = time.monotonic()
        if not self._dirty_access:
            return
        with self._env.begin(write=True) as txn:
            for k in self._dirty_access:
                e = self._entries.get(k)
                if e is not None:
                    txn.put(k.encode(), _RECORD.pack(e.size, e.last_access, e.state))
        self._dirty_access.clear()

    def close(self) -> None:
        self.flush()
        self._env.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the folder lock
            self._lock_fd = -1
