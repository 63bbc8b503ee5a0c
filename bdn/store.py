"""The blob store: content-addressed objects, manifests and refs over a local folder or
any fsspec filesystem (``s3://``, ``gs://``).

Layout under the root::

    objects/b3/<aa>/<bb>/<hex>        a chunk (or a manifest), raw bytes
    objects/b3/<aa>/<bb>/<hex>.zst    the same, zstd-encoded where that pays
    manifests/<hex>                   marker: this object is a manifest (listing, GC roots)
    refs/<namespace>/<model>/<tag>    "b3:<hex>\\n" — the manifest a ref names
    fingerprints/<kind>/<b3 of key>   source fingerprint → file entry already mirrored

Objects are immutable and written atomically (temp file + rename locally, one PUT on
object stores); writing an object that already exists is success, not an error (as in
kraken's CAStore). The encoding of an object is visible in its key, so any reader can
find it with one listing-free probe and the manifest records what was stored.

The local backend uses ``os`` calls directly: it is the default and the hot path of
``bdn mirror``, and fsspec's local filesystem adds overhead per call that shows at
thousands of objects. Remote roots go through fsspec with the same interface, except
that objects are streamed by exact ranged GETs (:class:`RangeReader`) rather than
fsspec's file objects, whose read-ahead fetches bytes nobody asked for: a cache pod
reads each object from the store once, byte for byte, holding one range at a time.

Its temporary files live in one folder per top-level prefix (``objects/.tmp/``,
``refs/.tmp/``, …), named ``<name>.tmp-<host>-<pid>-<random>``: an object is renamed from
there into its fan-out folder only when complete, so no store path ever shows part of
one, even after ``kill -9``. The few ``.tmp`` folders are cheap to scan, so opening a
store (and every mirror run) sweeps what dead processes of this host left; a temporary
of another host (a store on a shared file system) goes only once stale. A source on
another file system (``copy_file_range`` → ``EXDEV``) is copied with ``sendfile``; a
prefix mounted from another file system than its ``.tmp`` folder (``rename`` → ``EXDEV``)
is copied beside the object, then renamed. A full file system is :class:`StoreFullError`
(bytes, path): the store is full, not the source unreadable.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import blake3
import zstandard

from bdn import settings
from bdn.errors import NotFoundError, StoreError, StoreFullError
from bdn.fsutil import pid_alive
from manifests.digest import Digest
from manifests.errors import IntegrityError
from manifests.manifest import (
    ENCODING_RAW,
    ENCODING_ZSTD,
    Chunk,
    FileEntry,
    Manifest,
    canonical_json,
    manifest_from_dict,
    parse_manifest,
)
from manifests.refs import Ref

log = logging.getLogger(__name__)

# HTTP statuses that mean "no such object" (any other failure means the store is down).
NOT_FOUND_STATUSES = (404, 410)

OBJECTS_PREFIX = "objects/b3"
MANIFESTS_PREFIX = "manifests"
REFS_PREFIX = "refs"
FINGERPRINTS_PREFIX = "fingerprints"
ZSTD_SUFFIX = ".zst"
TMP_MARKER = ".tmp-"
TMP_DIR = ".tmp"
# Who wrote a temporary: a store on a shared file system has writers on several hosts,
# and a pid means something only on its own.
HOST_TAG = blake3.blake3(socket.gethostname().encode()).hexdigest()[:8]
# Errors of copy_file_range meaning "not between these two files": copy otherwise.
NO_KERNEL_COPY_ERRNOS = (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
INCOMING_NAME = "incoming"
# A chunk being received is written to at least every read timeout (60 s); one untouched
# for this long belongs to a mirror that died.
STALE_INCOMING_S = 3600.0
READ_BLOCK_BYTES = 4 * 1024 * 1024
# The most bytes one ranged GET of a remote store asks for when an object is streamed:
# large enough that a request's latency is small beside its transfer, small enough that
# a reader holds at most this much of an object in memory.
RANGE_SIZE_BYTES = 8 * 1024 * 1024
# Sizes of remote objects this process looked up, kept so that opening one just
# stat'ed costs no second request (objects are immutable: a key's size never changes).
KNOWN_SIZES_MAX = 4096


def default_store_url() -> str:
    return settings.STORE.get()


@dataclass(frozen=True)
class CompressionOptions:
    """When to store an object zstd-encoded.

    Weights rarely compress well and zstd decodes slower than the wire (measurements:
    bench/README.md), so compression is chosen per object, only where the saving is
    large: a sample is tried first (cheap), and the whole object is kept compressed only
    if it reaches ``min_ratio``.
    """

    enabled: bool = True
    min_ratio: float = 2.0
    level: int = 3
    sample_bytes: int = 128 * 1024
    min_object_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.min_ratio < 1.0:
            raise ValueError("CompressionOptions.min_ratio must be ≥ 1.0")
        if not -7 <= self.level <= 22:
            raise ValueError("CompressionOptions.level must be in [-7, 22]")
        if self.sample_bytes < 1024 or self.min_object_bytes < 0:
            raise ValueError("CompressionOptions: sample_bytes ≥ 1024, min_object_bytes ≥ 0")


@dataclass(frozen=True)
class StoreOptions:
    compression: CompressionOptions = CompressionOptions()
    # fsync objects before rename. Off by default: every reader verifies digests, so a
    # torn object after a power loss is detected and refetched, never served as valid.
    # Manifests and refs are always synced: they are what must never dangle.
    fsync_objects: bool = False
    storage_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class ObjectInfo:
    digest: Digest
    encoding: str
    stored_length: int


@dataclass(frozen=True)
class PutResult:
    encoding: str
    stored_length: int
    new: bool


def object_key(digest: Digest, encoding: str = ENCODING_RAW) -> str:
    h = digest.hex
    key = f"{OBJECTS_PREFIX}/{h[:2]}/{h[2:4]}/{h}"
    return key + ZSTD_SUFFIX if encoding == ENCODING_ZSTD else key


def zstd_form(n: int, read: Callable[[int, int], bytes | memoryview],
              options: CompressionOptions) -> bytes | None:
    """The zstd encoding of an object of ``n`` bytes, or None when it does not pay.
    ``read(offset, length)`` gives its bytes (from memory, or a file), so an object that
    stays raw is never read whole: a sample from its start, middle and end is tried
    first, cheaply, and only if it shrinks by ``min_ratio`` is the whole compressed
    (and kept if that reaches ``min_ratio`` too). Pure and deterministic."""
    if not options.enabled or n < options.min_object_bytes:
        return None
    s = options.sample_bytes
    mid = max(0, n // 2 - s // 2)
    samples = [read(0, min(s, n)), read(mid, min(s, n - mid)), read(max(0, n - s), min(s, n))]
    cctx = zstandard.ZstdCompressor(level=1)
    if sum(len(cctx.compress(x)) for x in samples) * options.min_ratio > \
            sum(len(x) for x in samples):
        return None
    packed = zstandard.ZstdCompressor(level=options.level).compress(read(0, n))
    return packed if len(packed) * options.min_ratio <= n else None


def choose_encoding(data: bytes | memoryview,
                    options: CompressionOptions) -> tuple[str, bytes | memoryview]:
    """Return ``(encoding, stored_bytes)`` for a chunk (pure, deterministic)."""
    packed = zstd_form(len(data), lambda off, k: data[off:off + k], options)
    return (ENCODING_ZSTD, packed) if packed is not None else (ENCODING_RAW, data)


def decode(encoding: str, stored: bytes, length: int) -> bytes:
    if encoding == ENCODING_RAW:
        return stored
    if encoding == ENCODING_ZSTD:
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=length)
    raise StoreError(f"unknown object encoding {encoding!r}")


class Backend(Protocol):
    """Byte storage under string keys; ``put`` must be atomic."""

    url: str

    def size(self, key: str) -> int | None: ...
    def put(self, key: str, data: bytes | memoryview, *, fsync: bool = False) -> bool: ...
    def get(self, key: str) -> bytes: ...
    def get_range(self, key: str, start: int, end: int) -> bytes: ...
    def open(self, key: str) -> BinaryIO: ...
    def list(self, prefix: str) -> Iterator[tuple[str, int]]: ...
    def delete(self, key: str) -> None: ...


class LocalBackend:
    """A folder. Atomic writes by temp file + ``os.replace``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)
        self._made_dirs: set[str] = set()

    def _path(self, key: str) -> Path:
        return self.root / key

    def size(self, key: str) -> int | None:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes | memoryview, *, fsync: bool = False) -> bool:
        def write(fd: int) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        return self._atomic(key, write, fsync, len(data))

    def put_from_fd(self, key: str, src_fd: int, offset: int, length: int, *,
                    fsync: bool = False) -> bool:
        """Store ``length`` bytes of an open file from ``offset`` without a user copy:
        ``copy_file_range``, or ``sendfile`` where the kernel will not copy between the
        two file systems (``EXDEV``)."""
        def write(fd: int) -> None:
            done = 0
            kernel_copy = True
            while done < length:
                if kernel_copy:
                    try:
                        n = os.copy_file_range(src_fd, fd, length - done, offset + done)
                    except OSError as e:
                        if e.errno not in NO_KERNEL_COPY_ERRNOS:
                            raise
                        kernel_copy = False
                        continue
                else:
                    n = os.sendfile(fd, src_fd, offset + done, length - done)
                if n == 0:
                    raise StoreError(f"source file ended {length - done} bytes early",
                                     url=self.url, key=key)
                done += n
        return self._atomic(key, write, fsync, length)

    def _atomic(self, key: str, write: Any, fsync: bool, length: int) -> bool:
        tmp = self.temp_path(key)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise self.full_error(e, key, length, tmp) from None
        try:
            write(fd)
            self.adopt(tmp, key, fd, fsync=fsync)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
                raise self.full_error(e, key, length, tmp) from None
            raise
        finally:
            os.close(fd)
        return True

    def full_error(self, e: OSError, key: str, length: int, path: str) -> Exception:
        """:class:`StoreFullError` for a write refused for space; ``e`` itself if not."""
        if e.errno not in FULL_ERRNOS:
            return e
        return StoreFullError(
            f"the store {self.url} is full: no space for {length:,d} bytes of {key} "
            f"(writing {path}); free space there or use another store",
            url=self.url, key=key, path=path, needed=length)

    def temp_path(self, near_key: str) -> str:
        """A fresh temporary name in the ``.tmp`` folder of ``near_key``'s top-level
        prefix (made if missing), so that :meth:`adopt` is a rename within one file
        system and :meth:`sweep_temps` finds it. Listings skip it."""
        top, _, rest = near_key.partition("/")
        folder = self.root / top / TMP_DIR
        self._make_dir(str(folder))
        name = (rest or top).rsplit("/", 1)[-1]
        return (f"{folder}/{name}{TMP_MARKER}{HOST_TAG}-{os.getpid()}-"
                f"{secrets.token_hex(4)}")

    def sweep_temps(self, now: float, stale_s: float = STALE_INCOMING_S) -> int:
        """Remove the temporaries of dead writers: of this host's processes that are
        gone, and of any writer untouched for ``stale_s``; returns how many."""
        # Best effort: a store this process may only read (or not yet made) is fine.
        removed = 0
        try:
            tops = [e.path for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except OSError:
            return 0
        for top in tops:
            try:
                entries = list(os.scandir(os.path.join(top, TMP_DIR)))
            except OSError:
                continue
            for entry in entries:
                if _dead_temp(entry, now, stale_s):
                    try:
                        os.unlink(entry.path)
                    except OSError:
                        continue
                    removed += 1
        return removed

    def _make_dir(self, folder: str) -> None:
        # Objects fan out over 65,536 folders; each is made once per process, not per write.
        if folder not in self._made_dirs:
            os.makedirs(folder, exist_ok=True)
            self._made_dirs.add(folder)

    def adopt(self, tmp: str, key: str, fd: int, *, fsync: bool) -> None:
        """Make the finished temporary file ``tmp`` (open as ``fd``) the object ``key``,
        atomically; replacing an identical object is harmless."""
        if fsync:
            os.fsync(fd)
        path = self._path(key)
        parent = str(path.parent)
        self._make_dir(parent)
        try:
            os.replace(tmp, path)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            # ``key``'s folder is another file system than the .tmp folder: copy beside
            # it (a name listings skip), then rename there.
            near = f"{path}{TMP_MARKER}{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                shutil.copyfile(tmp, near)
                if fsync:
                    _fsync_path(near)
                os.replace(near, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(near)
                raise
            os.unlink(tmp)
        if fsync:
            _fsync_path(parent)

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFoundError(f"{key} not found in store {self.url}", url=self.url,
                                key=key) from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return os.pread(f.fileno(), end - start, start)
        except FileNotFoundError:
            raise NotFoundError(f"{key} not found in store {self.url}", url=self.url,
                                key=key) from None

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{key} not found in store {self.url}", url=self.url,
                                key=key) from None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self._path(prefix)
        if not base.exists():
            return
        for dirpath, _, names in os.walk(base):
            for name in names:
                if TMP_MARKER in name:
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                with contextlib.suppress(FileNotFoundError):
                    yield rel, os.stat(full).st_size

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))


def _dead_temp(entry: os.DirEntry[str], now: float, stale_s: float) -> bool:
    """Whether a file in a ``.tmp`` folder is a temporary nobody will finish."""
    _, marker, owner = entry.name.rpartition(TMP_MARKER)
    if not marker or not entry.is_file(follow_symlinks=False):
        return False  # not a name this module makes: not ours to remove
    host, _, rest = owner.partition("-")
    pid = rest.partition("-")[0]
    if host == HOST_TAG and pid.isdigit() and int(pid) != os.getpid() \
            and not pid_alive(int(pid)):
        return True
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime >= stale_s
    except FileNotFoundError:
        return False


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RangeReader(io.RawIOBase):
    """A remote object of known ``size`` read as a file, by exact ranged GETs.

    fsspec's own file objects read ahead (a block of 5 MiB or more past what was asked,
    or again after a seek), so a cache pod filling an object from an ``http://`` store
    read up to a third more than the object. This asks ``fetch(start, end)`` for
    consecutive ranges of at most ``range_bytes`` that tile ``[0, size)`` exactly, and
    hands out each range in whatever pieces the caller reads: every byte of the object
    crosses the network once, nothing past its end, and at most one range is held in
    memory. A store that ignores ``Range`` and sends the whole object is tolerated (the
    object is then held whole, once); any other length is a :class:`StoreError` naming
    the offset.
    """

    def __init__(self, fetch: Callable[[int, int], bytes], size: int, *, url: str = "",
                 key: str = "", range_bytes: int = RANGE_SIZE_BYTES) -> None:
        super().__init__()
        if size < 0 or range_bytes <= 0:
            raise ValueError("RangeReader: size ≥ 0 and range_bytes > 0")
        self._fetch = fetch
        self.size = size
        self.url = url
        self.key = key
        self.range_bytes = range_bytes
        self._buf = b""
        self._buf_at = 0  # object offset of _buf[0]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _fill(self) -> memoryview:
        """The bytes at the current position that are already fetched (fetching the next
        range if none are); empty at the end of the object."""
        off = self._pos - self._buf_at
        if 0 <= off < len(self._buf):
            return memoryview(self._buf)[off:]
        if self._pos >= self.size:
            return memoryview(b"")
        end = min(self.size, self._pos + self.range_bytes)
        data = self._fetch(self._pos, end)
        if len(data) == end - self._pos:
            self._buf, self._buf_at = bytes(data), self._pos
        elif len(data) == self.size:
            # The store ignored Range and sent the whole object: keep it, ask no more.
            log.info("store %s sent all of %s for a range: it does not serve ranges",
                     self.url, self.key)
            self._buf, self._buf_at = bytes(data), 0
        else:
            raise StoreError(
                f"store {self.url} sent {len(data):,d} bytes of {self.key} for the range "
                f"at byte {self._pos:,d} of {end - self._pos:,d} bytes (object of "
                f"{self.size:,d})", url=self.url, key=self.key)
        return memoryview(self._buf)[self._pos - self._buf_at:]

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        view = self._fill()[:n]
        self._pos += len(view)
        return bytes(view)

    def readall(self) -> bytes:
        parts = []
        while block := self.read(self.range_bytes):
            parts.append(block)
        return b"".join(parts)

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        view = self._fill()[:len(out)]
        out[:len(view)] = view
        self._pos += len(view)
        return len(view)

    def close(self) -> None:
        self._buf = b""
        super().close()


class FsspecBackend:
    """Any fsspec filesystem (s3://, gs://, http://, memory://). One PUT per object is
    atomic. Objects are read by exact ranges (:class:`RangeReader`), never through
    fsspec's read-ahead file objects."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        opts = dict(storage_options or {})
        scheme, _, rest = self.url.partition("://")
        if scheme in ("gs", "gcs") and opts.get("endpoint_url"):
            from bdn.cloudfs import gcs_filesystem_class

            self.fs, root = gcs_filesystem_class(opts["endpoint_url"])(**opts), rest
        else:
            self.fs, root = fsspec.core.url_to_fs(self.url, **opts)
        self.root = root.rstrip("/")
        self._http = scheme in ("http", "https")
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self._sizes_lock = threading.Lock()

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def size(self, key: str) -> int | None:
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError as e:
            # fsspec's HTTP filesystem reports *any* failure (connection refused, a 503)
            # as FileNotFoundError; a store that is down must not look like a missing
            # object (a cache would answer 404, a mirror would upload again).
            cause = e.__cause__
            if (self._http and cause is not None
                    and getattr(cause, "status", None) not in NOT_FOUND_STATUSES):
                raise StoreError(f"store {self.url} unreachable: {type(cause).__name__}: "
                                 f"{cause}", url=self.url, key=key) from e
            return None
        if info.get("type") == "directory":
            return None
        size = int(info.get("size") or 0)
        if key.startswith(OBJECTS_PREFIX):
            with self._sizes_lock:
                self._sizes[key] = size
                self._sizes.move_to_end(key)
                if len(self._sizes) > KNOWN_SIZES_MAX:
                    self._sizes.popitem(last=False)
        return size

    def put(self, key: str, data: bytes | memoryview, *, fsync: bool = False) -> bool:
        self.fs.pipe_file(self._path(key), bytes(data))
        return True

    def get(self, key: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            raise NotFoundError(f"{key} not found in store {self.url}", url=self.url,
                                key=key) from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        try:
            return bytes(self.fs.cat_file(self._path(key), start=start, end=end))
        except FileNotFoundError:
            raise NotFoundError(f"{key} not found in store {self.url}", url=self.url,
                                key=key) from None

    def open(self, key: str) -> BinaryIO:
        with self._sizes_lock:
            size = self._sizes.get(key)
        if size is None:
            size = self.size(key)
        if size is None:
            raise NotFoundError(f"{key} not found in store {self.url}", url=self.url,
                                key=key)
        return RangeReader(lambda start, end: self.get_range(key, start, end),  # type: ignore[return-value]
                           size, url=self.url, key=key)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        try:
            found = self.fs.find(self._path(prefix), detail=True)
        except FileNotFoundError:
            return
        for path, info in found.items():
            rel = path[len(self.root) + 1:] if path.startswith(self.root) else path
            if TMP_MARKER not in rel:
                yield rel, int(info.get("size") or 0)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))


def open_backend(url: str, storage_options: dict[str, Any] | None = None) -> Backend:
    if "://" not in url or url.startswith("file://"):
        return LocalBackend(url[len("file://"):] if url.startswith("file://") else url)
    return FsspecBackend(url, storage_options)


class BlobStore:
    """Objects, manifests, refs and the fingerprint index over one backend."""

    def __init__(self, url: str | None = None, options: StoreOptions = StoreOptions(),
                 backend: Backend | None = None) -> None:
        self.options = options
        self.backend = backend or open_backend(url or default_store_url(),
                                               options.storage_options)
        self.url = self.backend.url
        if isinstance(self.backend, LocalBackend):
            # What a killed writer (a mirror, a cache fill) left is swept at open.
            self.backend.sweep_temps(now=time.time())

    def __repr__(self) -> str:
        return f"BlobStore({self.url!r})"

    # -- objects -----------------------------------------------------------------

    def stat_object(self, digest: Digest) -> ObjectInfo | None:
        for enc in (ENCODING_RAW, ENCODING_ZSTD):
            size = self.backend.size(object_key(digest, enc))
            if size is not None:
                return ObjectInfo(digest, enc, size)
        return None

    def has_object(self, digest: Digest) -> bool:
        return self.stat_object(digest) is not None

    def _existing(self, digest: Digest) -> PutResult | None:
        """Writing an object that is already there is success: what it was stored as."""
        info = self.stat_object(digest)
        return None if info is None else PutResult(info.encoding, info.stored_length, False)

    def put_chunk(self, digest: Digest, data: bytes | memoryview, *,
                  source: tuple[int, int] | None = None) -> PutResult:
        """Store raw chunk bytes under ``digest`` unless already there.

        The caller computed ``digest`` from ``data``; the encoding is chosen here. With
        ``source=(fd, offset)`` naming where ``data`` lies in an open file, a raw object
        in a local store is written by a kernel-side copy, so the bytes never cross into
        Python.
        """
        existing = self._existing(digest)
        if existing is not None:
            return existing
        encoding, stored = choose_encoding(data, self.options.compression)
        fsync = self.options.fsync_objects
        if source is not None and encoding == ENCODING_RAW \
                and isinstance(self.backend, LocalBackend):
            fd, offset = source
            self.backend.put_from_fd(object_key(digest), fd, offset, len(data), fsync=fsync)
        else:
            self.backend.put(object_key(digest, encoding), stored, fsync=fsync)
        return PutResult(encoding, len(stored), new=True)

    def incoming(self, length: int) -> Incoming:
        """A chunk of ``length`` bytes that arrives in order before its digest is known
        (streamed from a remote source): see :class:`Incoming`."""
        if isinstance(self.backend, LocalBackend):
            return _FileIncoming(self, self.backend, length)
        return _MemoryIncoming(self, length)

    def sweep_incoming(self, now: float, stale_s: float = STALE_INCOMING_S) -> int:
        """Delete the temporaries dead writers left (chunks a killed mirror was
        receiving, objects a killed writer was copying): of this host's processes that
        are gone, and any untouched for ``stale_s``; returns how many. Only a local
        store has them."""
        if not isinstance(self.backend, LocalBackend):
            return 0
        removed = self.backend.sweep_temps(now, stale_s)
        # Where chunks were received before temporaries had their own folder.
        try:
            entries = list(os.scandir(self.backend.root / OBJECTS_PREFIX))
        except FileNotFoundError:
            return removed
        for entry in entries:
            if not entry.name.startswith(INCOMING_NAME + TMP_MARKER):
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat(follow_symlinks=False).st_mtime >= stale_s:
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def get_object(self, digest: Digest, *, verify: bool = True) -> bytes:
        """Whole decoded object, verified against its digest."""
        info = self.stat_object(digest)
        if info is None:
            raise NotFoundError(f"object {digest} not found in store {self.url}",
                                url=self.url, key=str(digest))
        stored = self.backend.get(object_key(digest, info.encoding))
        data = decode(info.encoding, stored, 1 << 40)
        if verify:
            digest.verify(data, where=f"object in store {self.url}")
        return data

    def read_object_range(self, digest: Digest, start: int, end: int) -> bytes:
        """Decoded bytes ``[start, end)`` of an object (not verified: a part of it)."""
        info = self.stat_object(digest)
        if info is None:
            raise NotFoundError(f"object {digest} not found in store {self.url}",
                                url=self.url, key=str(digest))
        if info.encoding == ENCODING_RAW:
            return self.backend.get_range(object_key(digest), start, end)
        return self.get_object(digest, verify=False)[start:end]

    def iter_object(self, digest: Digest, block_bytes: int = READ_BLOCK_BYTES, *,
                    info: ObjectInfo | None = None) -> Iterator[bytes]:
        """Stream an object's decoded bytes in blocks (not verified; callers hash).
        ``info``: the caller's own :meth:`stat_object` answer, so a remote store is not
        asked for the object's size a second time."""
        info = info or self.stat_object(digest)
        if info is None:
            raise NotFoundError(f"object {digest} not found in store {self.url}",
                                url=self.url, key=str(digest))
        with self.backend.open(object_key(digest, info.encoding)) as f:
            if info.encoding == ENCODING_RAW:
                while block := f.read(block_bytes):
                    yield block
            else:
                reader = zstandard.ZstdDecompressor().stream_reader(f)
                while block := reader.read(block_bytes):
                    yield block

    def iter_objects(self) -> Iterator[tuple[Digest, str, int]]:
        for key, size in self.backend.list(OBJECTS_PREFIX):
            name = key.rsplit("/", 1)[-1]
            enc = ENCODING_ZSTD if name.endswith(ZSTD_SUFFIX) else ENCODING_RAW
            name = name.removesuffix(ZSTD_SUFFIX)
            try:
                yield Digest(name), enc, size
            except ValueError:
                continue

    # -- manifests ---------------------------------------------------------------

    def put_manifest(self, manifest: Manifest) -> Digest:
        """Store a manifest after checking every object it names exists."""
        missing = [c.digest for c in manifest.unique_chunks().values()
                   if not self.has_object(c.digest)]
        if missing:
            raise StoreError(f"refusing to write a manifest with {len(missing)} missing "
                             f"object(s), e.g. {missing[0]}", url=self.url)
        data = manifest.canonical_bytes()
        digest = Digest.of(data)
        if not self.has_object(digest):
            self.backend.put(object_key(digest), data, fsync=True)
        self.backend.put(f"{MANIFESTS_PREFIX}/{digest.hex}", b"", fsync=True)
        return digest

    def get_manifest(self, digest: Digest) -> Manifest:
        try:
            data = self.backend.get(object_key(digest))
        except NotFoundError:
            raise NotFoundError(f"manifest {digest} not found in store {self.url}",
                                url=self.url, key=str(digest)) from None
        return parse_manifest(data, expect=digest)

    def get_manifest_bytes(self, digest: Digest) -> bytes:
        data = self.backend.get(object_key(digest))
        digest.verify(data, where="manifest")
        return data

    def list_manifests(self) -> list[Digest]:
        out = []
        for key, _ in self.backend.list(MANIFESTS_PREFIX):
            with contextlib.suppress(ValueError):
                out.append(Digest(key.rsplit("/", 1)[-1]))
        return sorted(out)

    # -- refs --------------------------------------------------------------------

    def set_ref(self, ref: Ref, digest: Digest) -> None:
        if self.backend.size(f"{MANIFESTS_PREFIX}/{digest.hex}") is None:
            raise StoreError(f"refusing to point {ref} at {digest}: no such manifest",
                             url=self.url)
        self.backend.put(f"{REFS_PREFIX}/{ref.key}", f"{digest}\n".encode(), fsync=True)

    def get_ref(self, ref: Ref) -> Digest:
        try:
            text = self.backend.get(f"{REFS_PREFIX}/{ref.key}").decode().strip()
        except NotFoundError:
            raise NotFoundError(f"ref {ref} not found in store {self.url}", url=self.url,
                                key=str(ref)) from None
        return Digest.parse(text)

    def list_refs(self) -> list[tuple[Ref, Digest]]:
        out = []
        for key, _ in self.backend.list(REFS_PREFIX):
            parts = key.split("/")
            if len(parts) != 4:
                continue
            with contextlib.suppress(ValueError):
                ref = Ref(parts[1], parts[2], parts[3])
                out.append((ref, self.get_ref(ref)))
        return sorted(out, key=lambda x: str(x[0]))

    def resolve(self, name: str) -> tuple[Digest, Manifest]:
        """A ref (``ns/model:tag``) or a manifest digest (``b3:...``) → its manifest."""
        digest = Digest.parse(name) if name.startswith("b3:") else self.get_ref(Ref.parse(name))
        return digest, self.get_manifest(digest)

    # -- fingerprint index -------------------------------------------------------

    def _fingerprint_key(self, fingerprint: str) -> str:
        kind = fingerprint.split(":", 1)[0] or "other"
        return f"{FINGERPRINTS_PREFIX}/{kind}/{Digest.of(fingerprint.encode()).hex}"

    def get_fingerprint(self, fingerprint: str) -> FileEntry | None:
        """The file entry mirrored earlier for this source fingerprint, if its objects
        are all still in the store."""
        try:
            doc = json.loads(self.backend.get(self._fingerprint_key(fingerprint)))
            entry = manifest_from_dict({"version": 1, "source": {}, "files": [
                {"path": "x", **doc}]}).files[0]
        except NotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable fingerprint entry: %s", e)
            return None
        if not all(self.has_object(c.digest) for c in entry.chunks):
            return None
        return entry

    def put_fingerprint(self, fingerprint: str, entry: FileEntry) -> None:
        doc = entry.to_dict()
        doc.pop("path")
        self.backend.put(self._fingerprint_key(fingerprint), canonical_json(doc))

    # -- stats -------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        objects = stored = 0
        for _, _, size in self.iter_objects():
            objects += 1
            stored += size
        manifests = self.list_manifests()
        logical = 0
        referenced: dict[Digest, int] = {}
        for d in manifests:
            with contextlib.suppress(Exception):
                m = self.get_manifest(d)
                logical += m.total_size
                for c in m.unique_chunks().values():
                    referenced[c.digest] = c.length
        return {"objects": objects, "bytes_stored": stored, "manifests": len(manifests),
                "refs": len(self.list_refs()), "logical_bytes_referenced": logical,
                "unique_bytes_referenced": sum(referenced.values())}


def verify_chunk(chunk: Chunk, data: bytes | memoryview, where: str = "") -> None:
    if len(data) != chunk.length:
        raise IntegrityError(str(chunk.digest), f"<{len(data)} bytes, want {chunk.length}>",
                             where=where)
    chunk.digest.verify(data, where=where)


class Incoming(Protocol):
    """A chunk being received: ``write`` its bytes in order (BLAKE3 follows them), then
    ``commit`` stores it under its digest (or finds it already there). ``read_back``
    gives the bytes again until ``close``, which releases everything and discards an
    uncommitted chunk. A local store receives straight into a temporary file beside the
    objects, renamed into place on commit, so the bytes are written once and never wait
    in memory; other stores gather the chunk in memory for one upload."""

    length: int

    def write(self, data: bytes | memoryview) -> None: ...
    def digest(self) -> Digest: ...
    def commit(self) -> PutResult: ...
    def read_back(self) -> Iterator[bytes | memoryview]: ...
    def close(self) -> None: ...


class _IncomingBase:
    def __init__(self, store: BlobStore, length: int) -> None:
        self.store = store
        self.length = length
        self.received = 0
        self._hasher = blake3.blake3()

    def _count(self, n: int) -> None:
        if self.received + n > self.length:
            raise StoreError(f"chunk of {self.length} bytes received {self.received + n}",
                             url=self.store.url)
        self.received += n

    def digest(self) -> Digest:
        return Digest(self._hasher.hexdigest())

    def _check_complete(self) -> Digest:
        if self.received != self.length:
            raise StoreError(f"chunk of {self.length} bytes committed after "
                             f"{self.received}", url=self.store.url)
        return self.digest()


class _FileIncoming(_IncomingBase):
    def __init__(self, store: BlobStore, backend: LocalBackend, length: int) -> None:
        super().__init__(store, length)
        self.backend = backend
        self.tmp: str | None = backend.temp_path(f"{OBJECTS_PREFIX}/{INCOMING_NAME}")
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)

    def write(self, data: bytes | memoryview) -> None:
        self._count(len(data))
        self._hasher.update(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            assert self.tmp is not None
            raise self.backend.full_error(e, f"{OBJECTS_PREFIX}/{INCOMING_NAME}",
                                          self.length, self.tmp) from None

    def commit(self) -> PutResult:
        digest = self._check_complete()
        existing = self.store._existing(digest)
        if existing is not None:
            return existing
        opts = self.store.options
        packed = zstd_form(self.length, lambda off, k: os.pread(self.fd, k, off),
                           opts.compression)
        if packed is not None:
            self.backend.put(object_key(digest, ENCODING_ZSTD), packed,
                             fsync=opts.fsync_objects)
            return PutResult(ENCODING_ZSTD, len(packed), new=True)
        assert self.tmp is not None
        self.backend.adopt(self.tmp, object_key(digest), self.fd, fsync=opts.fsync_objects)
        self.tmp = None  # renamed: the object now, not ours to delete
        return PutResult(ENCODING_RAW, self.length, new=True)

    def read_back(self) -> Iterator[bytes | memoryview]:
        pos = 0
        while pos < self.received:
            block = os.pread(self.fd, min(READ_BLOCK_BYTES, self.received - pos), pos)
            if not block:
                raise StoreError(f"received chunk shrank at byte {pos}", url=self.store.url)
            yield block
            pos += len(block)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            self.tmp = None


class _MemoryIncoming(_IncomingBase):
    def __init__(self, store: BlobStore, length: int) -> None:
        super().__init__(store, length)
        self.buf = bytearray(length)

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        self._count(n)
        self._hasher.update(data)
        self.buf[self.received - n:self.received] = data

    def commit(self) -> PutResult:
        return self.store.put_chunk(self._check_complete(), memoryview(self.buf))

    def read_back(self) -> Iterator[bytes | memoryview]:
        yield memoryview(self.buf)[:self.received]

    def close(self) -> None:
        self.buf = bytearray()
