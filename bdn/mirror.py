"""The mirror: copy a source's files into the blob store as chunks, write the manifest,
then move the ref.

For each file, in this order: a *fingerprint* hit (the same upstream content mirrored
before, from any repository) reuses the recorded entry without reading a byte; otherwise
the file is planned into chunks (tensor-aligned for safetensors, FastCDC otherwise),
each chunk is hashed, and every chunk the store lacks is written.

How the bytes arrive depends on the source:

* **Local** files are mapped in place; a pool hashes and writes chunks (views of the
  ``mmap``; BLAKE3 and the kernel-side copy release the GIL), so every core works.
* **Remote** files are *streamed*: a safetensors header is one small ranged read, its
  chunk plan follows from it, and the bytes go from the socket into the chunk that owns
  them and from there into the store, once (:mod:`bdn.transfer.stream`). Several files
  are in flight at once (``fetch_files``), sharing the source's connection cap, so small
  files and the tail of a large one do not leave connections idle. Other files
  (content-defined cuts need the content) are spooled to a file first, then chunked
  like a local one.

A streamed file that was interrupted (a crash, a restart of the mirror service) resumes
from the chunks that landed: a small record beside the spool files lists them, and only
the rest is fetched.

Crash safety comes from ordering, not from locks: objects are written atomically and
idempotently; a fingerprint entry is written only after its file's objects; the manifest
only after every object it names (the store checks); the ref only after the manifest.
Killing the mirror at any point therefore leaves nothing that points at a missing object,
and running it again skips what already landed (and sweeps the temporaries the killed
run left). A store that runs out of space fails the run with the store's
:class:`~bdn.errors.StoreFullError`, never as a source that could not be read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import blake3

from bdn.errors import BdnError, MirrorError, SourceError
from bdn.fsutil import write_json_atomic
from bdn.patterns import select
from bdn.sources.base import Source, SourceFile
from bdn.sources.remote import RemoteSource
from bdn.store import BlobStore, PutResult
from bdn.transfer.cancel import AnyOf, CancelToken, MirrorCancelled
from bdn.transfer.spool import spool_paths
from bdn.transfer.stream import Landed
from manifests.chunking import DEFAULT_OPTIONS, ChunkingOptions, plan_cdc, plan_safetensors
from manifests.digest import Digest
from manifests.errors import SafetensorsError
from manifests.manifest import Chunk, FileEntry, build_manifest
from manifests.refs import Ref
from manifests.safetensors import PREFIX_BYTES, header_length, parse_header

log = logging.getLogger(__name__)

DEFAULT_WRITE_WORKERS = 4
DEFAULT_FETCH_FILES = 4
# One ranged read of this much usually holds a safetensors header whole (and the first
# tensors, which are not fetched again): the chunk plan costs one round trip per file.
HEADER_PROBE_BYTES = 256 * 1024
SAFETENSORS_SUFFIX = ".safetensors"

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class MirrorOptions:
    chunking: ChunkingOptions = DEFAULT_OPTIONS
    write_workers: int = DEFAULT_WRITE_WORKERS
    use_fingerprints: bool = True
    spool_dir: str | None = None
    # Remote files fetched at once (they share the source's connection cap).
    fetch_files: int = DEFAULT_FETCH_FILES

    def __post_init__(self) -> None:
        if not 1 <= self.write_workers <= 256:
            raise ValueError("MirrorOptions.write_workers must be in [1, 256]")
        if not 1 <= self.fetch_files <= 64:
            raise ValueError("MirrorOptions.fetch_files must be in [1, 64]")


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


@dataclass
class _Run:
    """What one ``Mirror.run`` shares across its threads."""

    stats: MirrorStats
    emit: ProgressFn
    stop: threading.Event  # set by the first failure, so other files stop early
    cancelled: CancelToken  # ``stop`` or the caller's cancel
    lock: threading.Lock = field(default_factory=threading.Lock)
    # First writer of each digest in this run; a repeat waits for that write's result.
    puts: dict[Digest, Future[PutResult]] = field(default_factory=dict)
    failure: BaseException | None = None


class Mirror:
    """Mirrors sources into one store. Thread-safe per call; reuse across calls."""

    def __init__(self, store: BlobStore, options: MirrorOptions = MirrorOptions()) -> None:
        self.store = store
        self.options = options
        self._lock = threading.Lock()
        self._plan_tag = Digest.of(repr(options.chunking).encode()).hex[:16]
        self._known_entries: dict[str, FileEntry] = {}

    def run(self, source: Source, *, ref: Ref | None = None,
            allow: Sequence[str] = (), ignore: Sequence[str] = (),
            progress: ProgressFn | None = None,
            cancel: threading.Event | None = None) -> MirrorResult:
        started = time.monotonic()
        emit_lock = threading.Lock()

        def emit(event: dict[str, Any]) -> None:
            if progress is not None:
                with emit_lock:  # events come from several threads; consumers need not care
                    progress(event)

        stats = MirrorStats()
        pinned = source.pin()
        listing = source.list_files()
        chosen = set(select([f.path for f in listing], allow, ignore))
        files = [f for f in listing if f.path in chosen]
        if not files:
            raise MirrorError(f"source {source.uri} has no files matching allow={list(allow)} "
                              f"ignore={list(ignore)}")
        emit({"event": "listed", "files": len(files), "bytes": sum(f.size for f in files)})
        # Temporaries a killed mirror left (chunks it was receiving or copying) would
        # otherwise stay in the store.
        self.store.sweep_incoming(now=time.time())
        stop = threading.Event()
        run = _Run(stats, emit, stop, AnyOf(stop, cancel) if cancel is not None else stop)
        spool = Path(self.options.spool_dir or tempfile.gettempdir())
        with ThreadPoolExecutor(self.options.write_workers,
                                thread_name_prefix="bdn-mirror") as pool:
            if isinstance(source, RemoteSource):
                entries = self._remote_files(source, files, spool, pool, run)
            else:
                entries = []
                for sf in files:
                    if run.cancelled.is_set():
                        raise MirrorCancelled(f"mirror of {source.uri} cancelled")
                    entries.append(self._file(source, sf, spool, pool, run))
        stats.bytes_from_origin = source.counters.bytes_from_origin
        manifest = build_manifest(entries, pinned)
        digest = self.store.put_manifest(manifest)
        emit({"event": "manifest", "digest": str(digest)})
        if ref is not None:
            self.store.set_ref(ref, digest)
            emit({"event": "ref", "ref": str(ref), "digest": str(digest)})
        stats.seconds = time.monotonic() - started
        return MirrorResult(digest, ref, stats, pinned)

    def _remote_files(self, source: RemoteSource, files: list[SourceFile], spool: Path,
                      pool: ThreadPoolExecutor, run: _Run) -> list[FileEntry]:
        """Several files at once; the entries in listing order. The first real failure
        stops the others (they end as cancelled) and is what the caller sees."""
        def one(sf: SourceFile) -> FileEntry:
            try:
                if run.cancelled.is_set():
                    raise MirrorCancelled(f"mirror of {source.uri} cancelled")
                return self._file(source, sf, spool, pool, run)
            except BaseException as e:
                with run.lock:
                    if run.failure is None and not run.stop.is_set():
                        run.failure = e
                run.stop.set()
                raise

        with ThreadPoolExecutor(self.options.fetch_files,
                                thread_name_prefix="bdn-mirror-file") as files_pool:
            futures = [files_pool.submit(one, sf) for sf in files]
            entries = []
            for fut in futures:
                try:
                    entries.append(fut.result())
                except BaseException:
                    for f in futures:
                        f.cancel()
                    break
        if run.failure is not None:
            raise run.failure
        if len(entries) != len(files):  # pragma: no cover - a failure is always recorded
            raise MirrorError(f"mirror of {source.uri} stopped after {len(entries)} of "
                              f"{len(files)} files")
        return entries

    # -- one file ----------------------------------------------------------------

    def _fp_key(self, fingerprint: str) -> str:
        # The recorded entry holds chunk cuts, so it is only valid for the chunking
        # options that made it: a change of options re-chunks instead of reusing.
        return f"{fingerprint}#plan:{self._plan_tag}"

    def _known(self, sf: SourceFile) -> FileEntry | None:
        """The entry mirrored earlier for this file's fingerprint, if still valid.

        A hit is remembered (objects are immutable), so mirroring the same upstream file
        again in this process does not repeat the lookup — one read plus a probe per
        chunk object, HEAD requests on S3.
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

    def _file(self, source: Source, sf: SourceFile, spool: Path, pool: ThreadPoolExecutor,
              run: _Run) -> FileEntry:
        stats = run.stats
        with run.lock:
            stats.files += 1
            stats.logical_bytes += sf.size
        known = self._known(sf)
        if known is not None:
            with run.lock:
                stats.files_reused += 1
                stats.bytes_reused += sf.size
            run.emit({"event": "bytes", "path": sf.path, "n": sf.size, "reused": True})
            entry = replace(known, path=sf.path, mode=sf.mode)
        else:
            try:
                if isinstance(source, RemoteSource):
                    entry = self._remote_file(source, sf, spool, pool, run)
                else:
                    with source.local_file(sf, spool) as local:
                        entry = self._chunk_file(local, sf, pool, run)
            except BdnError:
                raise
            except OSError as e:
                raise SourceError(f"reading {sf.path} from {source.uri} failed: "
                                  f"{e.strerror or e}", source=source.uri,
                                  file=sf.path) from None
            if sf.fingerprint:
                self.store.put_fingerprint(self._fp_key(sf.fingerprint), entry)
        run.emit({"event": "file", "path": sf.path, "size": sf.size,
                  "digest": str(entry.digest)})
        return entry

    def _tensor_plan(self, sf: SourceFile, size: int, read: Callable[[int, int], bytes]
                     ) -> tuple[list[tuple[int, int]] | None, bytes]:
        """Tensor-aligned spans of a safetensors file whose bytes ``read(start, end)``
        gives (its first ``HEADER_PROBE_BYTES`` in one read, then the rest of a longer
        header), and the bytes from offset 0 now at hand. ``None`` when the file is not
        safetensors or its header is bad: it is then chunked as an opaque file."""
        if not (sf.path.endswith(SAFETENSORS_SUFFIX) and size >= PREFIX_BYTES):
            return None, b""
        head = read(0, min(size, HEADER_PROBE_BYTES))
        try:
            n = PREFIX_BYTES + header_length(head[:PREFIX_BYTES], size, path=sf.path)
            if n > len(head):
                head += read(len(head), n)
            header = parse_header(head[:n], size, path=sf.path, strict=False)
        except SafetensorsError as e:
            log.warning("%s; chunking it as an opaque file", str(e))
            return None, head
        return plan_safetensors(header, self.options.chunking), head

    def _remote_file(self, source: RemoteSource, sf: SourceFile, spool: Path,
                     pool: ThreadPoolExecutor, run: _Run) -> FileEntry:
        if sf.size == 0:
            return FileEntry.from_chunks(sf.path, (), mode=sf.mode)
        spans, prefix = self._tensor_plan(sf, sf.size,
                                          lambda start, end: source.read_range(sf, start, end))
        if spans is not None:
            return self._stream_file(source, sf, spans, prefix, spool, run)
        # Content-defined cuts need the content: spool the file, then chunk it in place.
        with source.local_file(sf, spool, prefix=prefix) as local:
            return self._chunk_file(local, sf, pool, run)

    def _stream_file(self, source: RemoteSource, sf: SourceFile,
                     spans: list[tuple[int, int]], prefix: bytes, spool: Path,
                     run: _Run) -> FileEntry:
        """Stream ``sf`` into the store; chunks an interrupted attempt already stored
        (its record in the spool folder says which) are not fetched again."""
        record = _ResumeRecord(spool_paths(spool, source.uri, sf)[0].with_suffix(".stream"),
                               [sf.size, sf.fingerprint, self._plan_tag, len(spans)])
        chunks: dict[int, Chunk] = {}
        landed: dict[int, Landed] = {}
        for i, (digest, crc) in record.load().items():
            info = self.store.stat_object(digest) if i < len(spans) else None
            if info is None:
                continue
            off, length = spans[i]
            landed[i] = Landed(crc, lambda d=digest: [self.store.get_object(d)])
            chunks[off] = self._record(run, sf, digest, off, length,
                                       PutResult(info.encoding, info.stored_length, False))

        def on_chunk(i: int, crc: int | None) -> None:
            record.add(i, chunks[spans[i][0]].digest, crc)

        source.stream(sf, spans, prefix=prefix, cancel=run.cancelled, landed=landed,
                      on_chunk=on_chunk,
                      open_chunk=lambda off, length: _StreamedChunk(self, run, sf, off,
                                                                   length, chunks))
        record.remove()
        return FileEntry.from_chunks(sf.path, [chunks[off] for off, _ in spans], mode=sf.mode)

    def _plan(self, view: memoryview, size: int, sf: SourceFile) -> list[tuple[int, int]]:
        # Copies (≤ 100 MB by the bound): an exception's traceback must not pin views of
        # the map, or the map could not be closed.
        spans, _ = self._tensor_plan(sf, size, lambda start, end: bytes(view[start:end]))
        return spans if spans is not None else plan_cdc(view, self.options.chunking)

    def _chunk_file(self, local: Path, sf: SourceFile, pool: ThreadPoolExecutor,
                    run: _Run) -> FileEntry:
        fd = os.open(local, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return FileEntry.from_chunks(sf.path, (), mode=sf.mode)
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            mm.madvise(mmap.MADV_WILLNEED)
            view = memoryview(mm)
            slices: list[memoryview] = []
            pending: list[Future[Chunk]] = []
            try:
                for off, length in self._plan(view, size, sf):
                    if run.cancelled.is_set():
                        raise MirrorCancelled(f"mirror cancelled while reading {sf.path}")
                    piece = view[off:off + length]
                    slices.append(piece)
                    # Hashing and writing both run on the pool: BLAKE3 and
                    # copy_file_range release the GIL, so every core works.
                    pending.append(pool.submit(self._take, run, sf, off, piece, fd))
                chunks = [fut.result() for fut in pending]
            finally:
                # Every view of the map must be released before it can be closed; a
                # write still running holds one, so wait for all writes first.
                for fut in pending:
                    fut.exception()
                for piece in slices:
                    piece.release()
                view.release()
                mm.close()
        finally:
            os.close(fd)
        # The file digest is the hash of the chunk list: no second pass over the bytes.
        return FileEntry.from_chunks(sf.path, chunks, mode=sf.mode)

    def _take(self, run: _Run, sf: SourceFile, offset: int, piece: memoryview,
              fd: int | None = None) -> Chunk:
        """Hash one chunk and store it unless this run already has; ``fd``: the open
        file ``piece`` lies in at ``offset`` (lets a local store copy in the kernel)."""
        digest = Digest(blake3.blake3(piece).hexdigest())
        res = self._put_once(run, digest, lambda: self.store.put_chunk(
            digest, piece, source=(fd, offset) if fd is not None else None))
        return self._record(run, sf, digest, offset, len(piece), res)

    def _put_once(self, run: _Run, digest: Digest,
                  put: Callable[[], PutResult]) -> PutResult:
        """``put()`` for the first chunk of this run with ``digest``; a repeat is reused
        once that write has finished (another thread is doing it now: a short wait)."""
        with run.lock:
            first = run.puts.get(digest)
            if first is None:
                mine: Future[PutResult] = Future()
                run.puts[digest] = mine
        if first is not None:
            return replace(first.result(), new=False)
        try:
            res = put()
        except BaseException as e:
            mine.set_exception(e)
            raise
        mine.set_result(res)
        return res

    def _record(self, run: _Run, sf: SourceFile, digest: Digest, offset: int, length: int,
                res: PutResult) -> Chunk:
        with run.lock:
            if res.new:
                run.stats.objects_new += 1
                run.stats.bytes_uploaded += res.stored_length
            else:
                run.stats.objects_reused += 1
                run.stats.bytes_reused += length
        run.emit({"event": "object", "digest": str(digest), "new": res.new,
                  "path": sf.path, "n": length})
        run.emit({"event": "bytes", "path": sf.path, "n": length, "reused": not res.new})
        return Chunk(digest=digest, offset=offset, length=length, encoding=res.encoding,
                     stored_length=res.stored_length)


class _StreamedChunk:
    """A chunk of a streamed file (a :class:`~bdn.transfer.stream.ChunkSink`): its bytes
    go into the store as they arrive (:meth:`BlobStore.incoming`); on ``finish`` it is
    committed under its digest and recorded in ``out`` by offset."""

    def __init__(self, mirror: Mirror, run: _Run, sf: SourceFile, offset: int, length: int,
                 out: dict[int, Chunk]) -> None:
        self.mirror, self.run, self.sf = mirror, run, sf
        self.offset, self.length, self.out = offset, length, out
        self.incoming = mirror.store.incoming(length)

    def write(self, data: memoryview) -> None:
        self.incoming.write(data)

    def finish(self) -> None:
        digest = self.incoming.digest()
        res = self.mirror._put_once(self.run, digest, self.incoming.commit)
        self.out[self.offset] = self.mirror._record(self.run, self.sf, digest, self.offset,
                                                    self.length, res)

    def read_back(self) -> Iterator[bytes | memoryview]:
        return self.incoming.read_back()

    def close(self) -> None:
        self.incoming.close()


class _ResumeRecord:
    """Which chunks of a streamed file are stored already (index → digest, and CRC when
    the source's checksum is one), kept beside the spool files so a mirror restarted
    after a crash fetches only the rest of a large file. ``key`` must match, or the
    record is ignored (another size, upstream content or chunk plan)."""

    def __init__(self, path: Path, key: list[Any]) -> None:
        self.path = path
        self.key = key
        self.chunks: dict[str, list[Any]] = {}
        self.lock = threading.Lock()

    def load(self) -> dict[int, tuple[Digest, int | None]]:
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("key") != self.key:
                return {}
            self.chunks = {str(i): [str(h), c] for i, (h, c) in doc["chunks"].items()}
            return {int(i): (Digest(h), None if c is None else int(c))
                    for i, (h, c) in self.chunks.items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError, BdnError):
            return {}  # unreadable: fetch everything, as if there were none

    def add(self, index: int, digest: Digest, crc: int | None) -> None:
        with self.lock:
            self.chunks[str(index)] = [digest.hex, crc]
            write_json_atomic(self.path, {"key": self.key, "chunks": self.chunks})

    def remove(self) -> None:
        with self.lock, contextlib.suppress(FileNotFoundError):
            self.path.unlink()
