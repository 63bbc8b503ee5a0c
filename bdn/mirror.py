"""The mirror: copy a source's files into the blob store as chunks, write the manifest,
then move the ref.

For each file, in this order: a *fingerprint* hit (the same upstream content mirrored
before, from any repository) reuses the recorded entry without reading a byte; otherwise
the file is made local (in place for local sources, spooled for remote ones), planned
into chunks (tensor-aligned for safetensors, FastCDC otherwise), hashed, and every chunk
the store lacks is written. Hashing runs on the calling thread (BLAKE3 spreads a large
input over cores by itself) while a small pool writes objects, so reading, hashing and
writing overlap; memory stays bounded because chunks are views of an ``mmap``.

Crash safety comes from ordering, not from locks: objects are written atomically and
idempotently; a fingerprint entry is written only after its file's objects; the manifest
only after every object it names (the store checks); the ref only after the manifest.
Killing the mirror at any point therefore leaves nothing that points at a missing object,
and running it again skips what already landed.
"""

from __future__ import annotations

import logging
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import blake3

from bdn.errors import BdnError, MirrorError, SourceError
from bdn.patterns import select
from bdn.sources.base import Source, SourceFile
from bdn.store import BlobStore, PutResult
from manifests.chunking import DEFAULT_OPTIONS, ChunkingOptions, plan_cdc, plan_safetensors
from manifests.digest import Digest
from manifests.errors import SafetensorsError
from manifests.manifest import Chunk, FileEntry, build_manifest
from manifests.refs import Ref
from manifests.safetensors import PREFIX_BYTES, header_length, parse_header

log = logging.getLogger(__name__)

DEFAULT_WRITE_WORKERS = 4
SAFETENSORS_SUFFIX = ".safetensors"

ProgressFn = Callable[[dict[str, Any]], None]


class MirrorCancelled(MirrorError):
    """The mirror was cancelled; what was written so far stays valid and reusable."""


@dataclass(frozen=True)
class MirrorOptions:
    chunking: ChunkingOptions = DEFAULT_OPTIONS
    write_workers: int = DEFAULT_WRITE_WORKERS
    use_fingerprints: bool = True
    spool_dir: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.write_workers <= 256:
            raise ValueError("MirrorOptions.write_workers must be in [1, 256]")


@dataclass
class MirrorStats:
    files: int = 0
    files_reused: int = 0
    logical_bytes: int = 0
    bytes_uploaded: int = 0
    bytes_reused: int = 0
    objects_new: int = 0
    objects_reused: int = 0
    bytes_from_origin: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MirrorResult:
    manifest_digest: Digest
    ref: Ref | None
    stats: MirrorStats
    source: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": str(self.manifest_digest), "ref": str(self.ref) if self.ref else None,
                "source": self.source, **self.stats.to_dict()}


class Mirror:
    """Mirrors sources into one store. Thread-safe per call; reuse across calls."""

    def __init__(self, store: BlobStore, options: MirrorOptions = MirrorOptions()) -> None:
        self.store = store
        self.options = options
        self._lock = threading.Lock()
        self._plan_tag = Digest.of(repr(options.chunking).encode()).hex[:16]
        self._done: dict[Digest, tuple[str, int]] = {}
        self._known_entries: dict[str, FileEntry] = {}

    def run(self, source: Source, *, ref: Ref | None = None,
            allow: Sequence[str] = (), ignore: Sequence[str] = (),
            progress: ProgressFn | None = None,
            cancel: threading.Event | None = None) -> MirrorResult:
        started = time.monotonic()
        emit = progress or (lambda _e: None)
        stats = MirrorStats()
        pinned = source.pin()
        listing = source.list_files()
        chosen = set(select([f.path for f in listing], allow, ignore))
        files = [f for f in listing if f.path in chosen]
        if not files:
            raise MirrorError(f"source {source.uri} has no files matching allow={list(allow)} "
                              f"ignore={list(ignore)}")
        emit({"event": "listed", "files": len(files), "bytes": sum(f.size for f in files)})
        # Remote sources fetch one file ahead while this thread chunks the current one;
        # they ask before fetching whether a file is still needed (not known by
        # fingerprint), so the prefetch never downloads what the loop below would skip.
        plan = getattr(source, "plan_fetches", None)
        if callable(plan):
            plan(files, self._needs_fetch)
        entries: list[FileEntry] = []
        seen: set[Digest] = set()
        spool = Path(self.options.spool_dir or tempfile.gettempdir())
        with ThreadPoolExecutor(self.options.write_workers,
                                thread_name_prefix="bdn-mirror") as pool:
            for sf in files:
                if cancel is not None and cancel.is_set():
                    raise MirrorCancelled(f"mirror of {source.uri} cancelled")
                entry = self._file(source, sf, spool, pool, seen, stats, emit, cancel)
                entries.append(entry)
                emit({"event": "file", "path": sf.path, "size": sf.size,
                      "digest": str(entry.digest)})
        stats.bytes_from_origin = source.counters.bytes_from_origin
        manifest = build_manifest(entries, pinned)
        digest = self.store.put_manifest(manifest)
        emit({"event": "manifest", "digest": str(digest)})
        if ref is not None:
            self.store.set_ref(ref, digest)
            emit({"event": "ref", "ref": str(ref), "digest": str(digest)})
        stats.seconds = time.monotonic() - started
        return MirrorResult(digest, ref, stats, pinned)

    # -- one file ----------------------------------------------------------------

    def _fp_key(self, fingerprint: str) -> str:
        # The recorded entry holds chunk cuts, so it is only valid for the chunking
        # options that made it: a change of options re-chunks instead of reusing.
        return f"{fingerprint}#plan:{self._plan_tag}"

    def _known(self, sf: SourceFile) -> FileEntry | None:
        """The entry mirrored earlier for this file's fingerprint, if still valid.

        A remote source's prefetch asks first and the file loop asks again; a hit is
        remembered (objects are immutable), so the lookup — one read plus a probe per
        chunk object, HEAD requests on S3 — is not done twice.
        """
        if not (sf.fingerprint and self.options.use_fingerprints):
            return None
        key = self._fp_key(sf.fingerprint)
        with self._lock:
            known = self._known_entries.get(key)
        if known is None:
            known = self.store.get_fingerprint(key)
            if known is None:
                return None
            with self._lock:
                self._known_entries[key] = known
        return known if known.size == sf.size else None

    def _needs_fetch(self, sf: SourceFile) -> bool:
        return self._known(sf) is None

    def _file(self, source: Source, sf: SourceFile, spool: Path, pool: ThreadPoolExecutor,
              seen: set[Digest], stats: MirrorStats, emit: ProgressFn,
              cancel: threading.Event | None) -> FileEntry:
        stats.files += 1
        stats.logical_bytes += sf.size
        known = self._known(sf)
        if known is not None:
            stats.files_reused += 1
            stats.bytes_reused += sf.size
            emit({"event": "bytes", "path": sf.path, "n": sf.size, "reused": True})
            return replace(known, path=sf.path, mode=sf.mode)
        try:
            with source.local_file(sf, spool) as local:
                entry = self._chunk_file(local, sf, pool, seen, stats, emit, cancel)
        except BdnError:
            raise
        except OSError as e:
            raise SourceError(f"reading {sf.path} from {source.uri} failed: {e.strerror or e}",
                              source=source.uri, file=sf.path) from None
        if sf.fingerprint:
            self.store.put_fingerprint(self._fp_key(sf.fingerprint), entry)
        return entry

    def _plan(self, view: memoryview, size: int, sf: SourceFile) -> list[tuple[int, int]]:
        opts = self.options.chunking
        if sf.path.endswith(SAFETENSORS_SUFFIX) and size >= PREFIX_BYTES:
            try:
                # Copies (≤ 100 MB by the bound): an exception's traceback must not pin
                # views of the map, or the map could not be closed.
                n = header_length(bytes(view[:PREFIX_BYTES]), size, path=sf.path)
                header = parse_header(bytes(view[:PREFIX_BYTES + n]), size, path=sf.path)
                return plan_safetensors(header, opts)
            except SafetensorsError as e:
                log.warning("%s; chunking it as an opaque file", str(e))
        return plan_cdc(view, opts)

    def _chunk_file(self, local: Path, sf: SourceFile, pool: ThreadPoolExecutor,
                    seen: set[Digest], stats: MirrorStats, emit: ProgressFn,
                    cancel: threading.Event | None) -> FileEntry:
        fd = os.open(local, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return FileEntry.from_chunks(sf.path, (), mode=sf.mode)
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            mm.madvise(mmap.MADV_WILLNEED)
            view = memoryview(mm)
            slices: list[memoryview] = []
            pending: list[tuple[int, int, Future[tuple[Digest, PutResult | None]]]] = []
            try:
                spans = self._plan(view, size, sf)
                for off, length in spans:
                    if cancel is not None and cancel.is_set():
                        raise MirrorCancelled(f"mirror cancelled while reading {sf.path}")
                    piece = view[off:off + length]
                    slices.append(piece)
                    # Hashing and writing both run on the pool: BLAKE3 and
                    # copy_file_range release the GIL, so every core works.
                    pending.append((off, length,
                                    pool.submit(self._hash_put, fd, off, piece, seen)))
                # Wait for every task of the file before resolving repeats: a repeat's
                # first occurrence may be a later chunk whose write is still running.
                results = [fut.result() for _, _, fut in pending]
                chunks = []
                for (off, length, _), (digest, put) in zip(pending, results, strict=True):
                    res = put or PutResult(*self._done[digest], new=False)
                    if res.new:
                        stats.objects_new += 1
                        stats.bytes_uploaded += res.stored_length
                    else:
                        stats.objects_reused += 1
                        stats.bytes_reused += length
                    chunks.append(Chunk(digest=digest, offset=off, length=length,
                                        encoding=res.encoding, stored_length=res.stored_length))
                    emit({"event": "object", "digest": str(digest), "new": res.new,
                          "path": sf.path, "n": length})
                    emit({"event": "bytes", "path": sf.path, "n": length, "reused": not res.new})
            finally:
                # Every view of the map must be released before it can be closed; a
                # write still running holds one, so wait for all writes first.
                for _, _, fut in pending:
                    fut.exception()
                for piece in slices:
                    piece.release()
                view.release()
                mm.close()
        finally:
            os.close(fd)
        # The file digest is the hash of the chunk list: no second pass over the bytes.
        return FileEntry.from_chunks(sf.path, chunks, mode=sf.mode)

    def _hash_put(self, fd: int, offset: int, piece: memoryview,
                  seen: set[Digest]) -> tuple[Digest, PutResult | None]:
        """Hash a chunk and store it unless this run already did; ``None`` for a repeat
        (its result is in ``self._done`` once every earlier task has finished)."""
        digest = Digest(blake3.blake3(piece).hexdigest())
        with self._lock:
            if digest in seen:
                return digest, None
            seen.add(digest)
        res = self.store.put_chunk(digest, piece, source=(fd, offset))
        with self._lock:
            self._done[digest] = (res.encoding, res.stored_length)
        return digest, res
