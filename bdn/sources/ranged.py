"""What every remote source shares: the :class:`RemoteSource` base, request limits,
retries, checksums, the event-loop stream reader, and the spool.

Safetensors files are streamed into the store (:mod:`bdn.sources.stream`); other files
are spooled here — parallel ranged downloads into a local file, with retries, resume
and verification. Every remote source (Hugging Face, S3, GCS) does both the same way,
so the hard parts live here once:

* The file is cut into parts of ``part_bytes``; ``concurrency`` parts are fetched at once
  (one connection each), each written with ``pwrite`` at its offset into a sparse spool
  file. One TCP stream rarely fills a fast link; several do.
* A part that fails (timeout, reset, 5xx, 408, 429) is retried under the shared
  :class:`~bdn.retry.RetryPolicy` (capped exponential backoff, full jitter,
  ``Retry-After`` as a floor) and *resumed*: the next request asks for ``Range`` from the
  first byte not yet written, so a dropped connection costs only what was in flight.
* Finished parts are recorded in a small state file next to the spool, so a mirror
  killed mid-file (service restart) resumes at the parts it lacks.
* The content is verified against the source's checksum (LFS sha256, MD5, git blob sha1)
  by a hasher thread that follows the contiguous finished prefix, so hashing overlaps the
  download instead of adding a pass after it. A spool that fails verification is deleted;
  a resumed one is refetched once from scratch (it may predate a change at the origin).
* A global semaphore (shared by all jobs of a mirror service) caps requests in flight
  across jobs; ``concurrency`` caps them per source, across its files.
* Bytes from GCS and the Hub are read on blocking sockets by the thread that consumes
  them (:mod:`bdn.sources.http_range`); from S3 by :func:`loop_stream_fetcher`, one
  streamed response per range on fsspec's event loop (aiobotocore signs each request),
  read ahead and handed to the calling thread in blocks.

Fetchers are plain callables ``fetch(start, end) -> Iterator[bytes]`` that raise
:class:`~bdn.retry.RetryableError` for transient failures and
:class:`~bdn.errors.SourceError` (or :class:`~bdn.errors.AuthError`) for final ones.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import threading
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import blake3

from bdn.errors import AuthError, SourceError
from bdn.fsutil import write_json_atomic
from bdn.retry import RetryableError, RetryPolicy, retry_sync
from bdn.secrets import scrub
from bdn.sources.base import FetchCounters, Source, SourceFile
from bdn.sources.crc import CrcHasher, CrcKind

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
# Large enough that per-request costs (latency, billing, stores that read a whole object
# for every ranged GET) stay small; small enough that 8 of them keep a single large file
# on several connections, and that chunks waiting for the in-order checksum stay few.
DEFAULT_PART_BYTES = 32 * MiB
DEFAULT_CONCURRENCY = 8
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_READ_TIMEOUT_S = 60.0
HASH_BLOCK_BYTES = 4 * MiB
SPOOL_PREFIX = "bdn-spool-"
DEFAULT_RETRY = RetryPolicy(attempts=6, base_delay_s=0.2, max_delay_s=10.0)


@dataclass(frozen=True)
class DownloadOptions:
    """How remote files are fetched. Sizes in bytes, times in seconds."""

    part_bytes: int = DEFAULT_PART_BYTES
    concurrency: int = DEFAULT_CONCURRENCY
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    # Longest wait for the next byte of a response; a stalled stream is a failed one.
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    retry: RetryPolicy = DEFAULT_RETRY
    verify: bool = True

    def __post_init__(self) -> None:
        if self.part_bytes < 64 * 1024:
            raise ValueError("DownloadOptions.part_bytes must be ≥ 64 KiB")
        if not 1 <= self.concurrency <= 256:
            raise ValueError("DownloadOptions.concurrency must be in [1, 256]")
        if self.connect_timeout_s <= 0 or self.read_timeout_s <= 0:
            raise ValueError("DownloadOptions timeouts must be > 0")


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> Any: ...
    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class Checksum:
    """What the downloaded bytes must hash to: ``new()`` makes a fresh hasher whose
    ``hexdigest()`` must equal ``expected_hex``. ``crc``: set for a CRC, which can also be
    computed per piece and combined (:mod:`bdn.sources.crc`)."""

    kind: str
    expected_hex: str
    new: Callable[[], Hasher]
    crc: CrcKind | None = None

    @classmethod
    def of_crc(cls, crc: CrcKind, expected_b64: str) -> Checksum:
        return cls(crc.name, expected_b64, lambda: CrcHasher(crc), crc=crc)


Fetch = Callable[[int, int], Iterator[bytes]]


class CancelToken(Protocol):
    """What a download checks to stop early: a :class:`threading.Event` or :class:`AnyOf`."""

    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class AnyOf:
    """Set when any of its events is set (a job's cancel, or the source closing)."""

    POLL_S = 0.05

    def __init__(self, *events: CancelToken) -> None:
        self.events = events

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = self.POLL_S if deadline is None else min(self.POLL_S,
                                                            deadline - time.monotonic())
            if left <= 0:
                return False
            self.events[0].wait(left)
        return True


def spool_paths(spool_dir: Path, source_uri: str, file: SourceFile) -> tuple[Path, Path]:
    """Spool and state paths: stable for the same upstream content, so a restart finds
    them; keyed by a hash so no upstream path reaches the file system."""
    key = blake3.blake3(json.dumps([source_uri, file.path, file.size, file.fingerprint])
                        .encode()).hexdigest()[:32]
    base = spool_dir / f"{SPOOL_PREFIX}{key}"
    return base.with_suffix(".part"), base.with_suffix(".state")


class _Progress:
    """Which parts are done and how far each has been written (thread-safe)."""

    def __init__(self, parts: list[tuple[int, int]], done: set[int]) -> None:
        self.parts = parts
        self.done = set(done)
        self.cond = threading.Condition()
        self.failed = False

    def mark_done(self, i: int) -> None:
        with self.cond:
            self.done.add(i)
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


@contextmanager
def holding(slots: Sequence[threading.Semaphore]) -> Iterator[None]:
    """Hold one slot of each semaphore for a request: acquired in the given order (always
    the same, so waiters cannot deadlock), released in reverse."""
    with contextlib.ExitStack() as stack:
        for slot in slots:
            stack.enter_context(slot)
        yield


def _cancelled(cancel: CancelToken | None, file: SourceFile) -> None:
    if cancel is not None and cancel.is_set():
        from bdn.mirror import MirrorCancelled

        raise MirrorCancelled(f"mirror cancelled while downloading {file.path}")


def fetch_resumable(fetch: Fetch, start: int, end: int, take: Callable[[int, bytes], None],
                    *, source_uri: str, file: SourceFile, options: DownloadOptions,
                    counters: FetchCounters, counter_lock: threading.Lock,
                    cancel: CancelToken | None = None,
                    request_slots: Sequence[threading.Semaphore] = (),
                    check: Callable[[], None] | None = None) -> None:
    """Bytes ``[start, end)`` of ``file``, each block handed to ``take(offset, block)`` in
    order. A failed request is retried under ``options.retry`` and *resumed* from the
    first byte not taken, so a dropped connection costs only what was in flight. Every
    request holds one slot of each of ``request_slots``; ``check`` (and the cancel) is
    asked before each block. Raises :class:`SourceError` naming the source and file when
    the last attempt fails."""
    pos = start

    def attempt() -> None:
        nonlocal pos
        if check is not None:
            check()
        _cancelled(cancel, file)
        if pos >= end:
            return
        with holding(request_slots):
            for block in fetch(pos, end):
                if check is not None:
                    check()
                _cancelled(cancel, file)
                n = len(block)
                if pos + n > end:
                    raise SourceError(f"{file.path} from {source_uri}: origin sent more "
                                      "bytes than asked for", source=source_uri,
                                      file=file.path)
                with counter_lock:
                    counters.bytes_from_origin += n
                take(pos, block)
                pos += n
        if pos < end:
            raise RetryableError(f"short read: connection ended at byte {pos} of "
                                 f"[{start}, {end})")

    def on_retry(n: int, e: BaseException, delay: float) -> None:
        log.warning("%s from %s bytes [%d, %d): attempt %d failed (%s); resuming at byte %d "
                    "in %.2fs", file.path, source_uri, start, end, n, scrub(str(e)), pos,
                    delay)

    try:
        retry_cancellable(attempt, options.retry, cancel, on_retry=on_retry)
    except RetryableError as e:
        raise SourceError(f"{file.path} from {source_uri}: giving up after "
                          f"{options.retry.attempts} attempts: {scrub(str(e))}",
                          source=source_uri, file=file.path, status=e.status) from None


def spool_file(*, source_uri: str, file: SourceFile, spool_dir: Path, fetch: Fetch,
               options: DownloadOptions, counters: FetchCounters,
               counter_lock: threading.Lock, checksum: Checksum | None = None,
               cancel: CancelToken | None = None,
               request_slots: Sequence[threading.Semaphore] = (), prefix: bytes = b"") -> Path:
    """Download ``file`` into a spool file and return its path (the caller deletes it
    with :func:`remove_spool` once used); ``prefix``: its first bytes, already fetched.
    Raises :class:`SourceError` naming the source and file when it cannot."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    # A resumed spool that fails verification may predate a change at the origin: it is
    # deleted and fetched once more from scratch; a fresh one failing is final.
    while True:
        path, resumed = _download(source_uri, file, spool_dir, fetch, options, counters,
                                  counter_lock, checksum, cancel, request_slots, prefix)
        if path is not None:
            return path
        if not resumed:
            break
        log.warning("resumed spool of %s from %s failed verification; refetching", file.path,
                    source_uri)
    assert checksum is not None
    raise SourceError(f"{file.path} from {source_uri}: downloaded bytes do not match the "
                      f"source's {checksum.kind} checksum (the object changed during the "
                      "mirror, or the origin served corrupt data)",
                      source=source_uri, file=file.path)


def remove_spool(spool_dir: Path, source_uri: str, file: SourceFile) -> None:
    for p in spool_paths(spool_dir, source_uri, file):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _load_state(state_path: Path, file: SourceFile, part_bytes: int) -> set[int]:
    try:
        doc = json.loads(state_path.read_text())
    except (FileNotFoundError, ValueError):
        return set()
    if doc.get("size") != file.size or doc.get("part_bytes") != part_bytes or \
            doc.get("fingerprint") != file.fingerprint:
        return set()
    return {int(i) for i in doc.get("done", [])}


def _save_state(state_path: Path, file: SourceFile, part_bytes: int, done: set[int]) -> None:
    write_json_atomic(state_path, {"size": file.size, "part_bytes": part_bytes,
                                   "fingerprint": file.fingerprint, "done": sorted(done)})


def _download(source_uri: str, file: SourceFile, spool_dir: Path, fetch: Fetch,
              options: DownloadOptions, counters: FetchCounters,
              counter_lock: threading.Lock, checksum: Checksum | None,
              cancel: CancelToken | None, request_slots: Sequence[threading.Semaphore],
              prefix: bytes) -> tuple[Path | None, bool]:
    """One try: ``(path, resumed)``; path is None when verification failed."""
    path, state_path = spool_paths(spool_dir, source_uri, file)
    size = file.size
    step = options.part_bytes
    parts = [(s, min(s + step, size)) for s in range(0, size, step)]
    done = _load_state(state_path, file, step) if path.exists() else set()
    done &= set(range(len(parts)))
    resumed = bool(done)
    flags = os.O_RDWR | os.O_CREAT
    fd = os.open(path, flags, 0o600)
    try:
        if not resumed:
            os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        have = min(len(prefix), size)
        if have:  # bytes a probe already fetched: not fetched again
            os.pwrite(fd, memoryview(prefix)[:have], 0)
            done |= {i for i, (_, end) in enumerate(parts) if end <= have}
        progress = _Progress(parts, done)
        state_lock = threading.Lock()
        verify = checksum if options.verify else None
        hasher_thread: threading.Thread | None = None
        result: dict[str, str] = {}
        if verify is not None:
            hasher_thread = threading.Thread(
                target=_hash_follow, args=(fd, progress, verify, result),
                name="bdn-spool-hash", daemon=True)
            hasher_thread.start()

        def run_part(i: int) -> None:
            start, end = parts[i]

            def take(off: int, block: bytes) -> None:
                view = memoryview(block)
                while view:
                    k = os.pwrite(fd, view, off)
                    view, off = view[k:], off + k

            fetch_resumable(fetch, max(start, min(have, end)), end, take,
                            source_uri=source_uri, file=file, options=options,
                            counters=counters, counter_lock=counter_lock, cancel=cancel,
                            request_slots=request_slots)
            progress.mark_done(i)
            with state_lock:
                _save_state(state_path, file, step, progress.done)

        todo = [i for i in range(len(parts)) if i not in done]
        try:
            if todo:
                workers = min(options.concurrency, len(todo))
                with ThreadPoolExecutor(workers, thread_name_prefix="bdn-range") as pool:
                    futures = [pool.submit(run_part, i) for i in todo]
                    try:
                        for fut in futures:
                            fut.result()
                    except BaseException:
                        # Let the others stop at their next block instead of finishing
                        # downloads nobody will use.
                        for f in futures:
                            f.cancel()
                        raise
        except BaseException:
            progress.fail()
            if hasher_thread is not None:
                hasher_thread.join()
            raise
        if hasher_thread is not None:
            hasher_thread.join()
            assert verify is not None
            got = result.get("hex")
            if got != verify.expected_hex:
                os.close(fd)
                fd = -1
                remove_spool(spool_dir, source_uri, file)
                return None, resumed
        return path, resumed
    finally:
        if fd >= 0:
            os.close(fd)


def _hash_follow(fd: int, progress: _Progress, checksum: Checksum,
                 result: dict[str, str]) -> None:
    """Hash the spool in order, part by part, as soon as each part is finished."""
    h = checksum.new()
    for i, (start, end) in enumerate(progress.parts):
        with progress.cond:
            while i not in progress.done and not progress.failed:
                progress.cond.wait()
            if progress.failed:
                return
        pos = start
        while pos < end:
            block = os.pread(fd, min(HASH_BLOCK_BYTES, end - pos), pos)
            if not block:
                return
            h.update(block)
            pos += len(block)
    result["hex"] = h.hexdigest()


def retry_or_fail(attempt: Callable[[], T], policy: RetryPolicy, *, uri: str, what: str,
                  path: str = "") -> T:
    """:func:`retry_sync` for a source's metadata call (listing, model info): when the
    attempts are spent, a :class:`SourceError` naming the source, the call and the file."""
    try:
        return retry_sync(attempt, policy)
    except RetryableError as e:
        raise SourceError(f"source {uri}: {what} failed after {policy.attempts} attempts: "
                          f"{e}", source=uri, file=path, status=e.status) from None


def retry_cancellable(fn: Callable[[], T], policy: RetryPolicy,
                      cancel: CancelToken | None, *,
                      on_retry: Callable[[int, BaseException, float], None] | None = None) -> T:
    """:func:`bdn.retry.retry_sync`, but a cancel wakes the backoff sleep at once, so a
    job waiting out a long ``Retry-After`` can still be cancelled promptly."""
    if cancel is None:
        return retry_sync(fn, policy, on_retry=on_retry)

    def sleep(delay_s: float) -> None:
        if cancel.wait(delay_s):
            from bdn.mirror import MirrorCancelled

            raise MirrorCancelled("mirror cancelled while waiting to retry") from None

    return retry_sync(fn, policy, on_retry=on_retry, sleep=sleep)


_deleter_pool: ThreadPoolExecutor | None = None
_deleter_lock = threading.Lock()


def _deleter() -> ThreadPoolExecutor:
    """One background thread that deletes used spools (joined at interpreter exit)."""
    global _deleter_pool
    with _deleter_lock:
        if _deleter_pool is None:
            _deleter_pool = ThreadPoolExecutor(1, thread_name_prefix="bdn-spool-rm")
        return _deleter_pool


def flush_spool_deletes() -> None:
    """Wait until every spool deletion queued so far has happened (FIFO, one worker)."""
    _deleter().submit(lambda: None).result()


class RemoteSource(Source):
    """A source whose files are fetched by byte range; subclasses provide the fetcher
    and the checksum, this class the streaming (:meth:`stream`, the mirror's main path),
    the spooling (:meth:`local_file`, for large files whose chunks depend on their
    content), resume, retries and counting.

    Requests in flight are capped at ``download.concurrency`` across all of this source's
    files, so a mirror that streams several files at once still opens that many
    connections, not that many per file; ``request_slots`` (the mirror service's global
    cap) applies on top.
    """

    def __init__(self, *, download: DownloadOptions | None = None,
                 cancel: CancelToken | None = None,
                 request_slots: threading.Semaphore | None = None) -> None:
        super().__init__()
        self.download = download or DownloadOptions()
        self.cancel = cancel
        self.request_slots = request_slots
        self._slots = threading.BoundedSemaphore(self.download.concurrency)
        self._counter_lock = threading.Lock()
        self._closing = threading.Event()
        self._stop_token: CancelToken = AnyOf(self._closing, cancel) if cancel else self._closing

    @abstractmethod
    def fetcher(self, file: SourceFile) -> Fetch:
        """``fetch(start, end)`` streaming bytes ``[start, end)`` of ``file``."""

    def checksum(self, file: SourceFile) -> Checksum | None:
        """What ``file``'s bytes must hash to, when the source knows."""
        return None

    def read_range(self, file: SourceFile, start: int, end: int) -> bytes:
        out = bytearray()
        fetch_resumable(self.fetcher(file), start, end, lambda _off, block: out.extend(block),
                        source_uri=self.uri, file=file, options=self.download,
                        counters=self.counters, counter_lock=self._counter_lock,
                        cancel=self._stop_token)
        return bytes(out)

    def stream(self, file: SourceFile, spans: Sequence[tuple[int, int]], *,
               open_chunk: Callable[[int, int], Any], prefix: bytes = b"",
               cancel: CancelToken | None = None, landed: Any = None,
               on_chunk: Callable[[int, int | None], None] | None = None) -> None:
        """Fetch ``file`` into one sink per chunk of ``spans`` (tiling the file), made by
        ``open_chunk(offset, length)``; sinks are fed from worker threads, each chunk in
        order. ``prefix``: bytes from offset 0 already fetched; ``landed`` and
        ``on_chunk``: resuming an interrupted attempt. See :mod:`bdn.sources.stream`."""
        from bdn.sources.stream import stream_file

        stop = AnyOf(self._stop_token, cancel) if cancel is not None else self._stop_token
        stream_file(source_uri=self.uri, file=file, spans=spans, prefix=prefix,
                    fetch=self.fetcher(file), open_chunk=open_chunk, options=self.download,
                    counters=self.counters, counter_lock=self._counter_lock,
                    checksum=self.checksum(file), cancel=stop,
                    request_slots=self._request_slots(), landed=landed, on_chunk=on_chunk)

    def _request_slots(self) -> list[threading.Semaphore]:
        # Always in this order (own cap, then the global one), so waiters cannot deadlock.
        return [self._slots] + ([self.request_slots] if self.request_slots else [])

    @contextmanager
    def local_file(self, file: SourceFile, spool_dir: Path, *,
                   prefix: bytes = b"") -> Iterator[Path]:
        """Spool ``file`` (``prefix``: its first bytes, already fetched) for the block."""
        path = spool_file(source_uri=self.uri, file=file, spool_dir=spool_dir,
                          fetch=self.fetcher(file), options=self.download,
                          counters=self.counters, counter_lock=self._counter_lock,
                          checksum=self.checksum(file), cancel=self._stop_token,
                          request_slots=self._request_slots(), prefix=prefix)
        yield path
        # Only a file that was used is deleted: after a failure the spool stays so a
        # retried job resumes it (stale spools are swept by the mirror service). Freeing
        # a large file's pages takes tens of milliseconds, so it happens off this thread.
        _deleter().submit(remove_spool, spool_dir, self.uri, file)

    def close(self) -> None:
        """Stop downloads still running (a partial spool stays for a resume)."""
        self._closing.set()


def classify_fs_error(exc: BaseException, where: str, uri: str, path: str = "", *,
                      service: str, auth_markers: tuple[str, ...]) -> BaseException:
    """Map an fsspec (s3fs/gcsfs) failure to AuthError / SourceError / RetryableError.

    Denials and missing objects are final; bad arguments are final; everything else
    (5xx, throttling, timeouts, resets) is worth another attempt. Secrets are scrubbed
    from the text before it reaches any message.
    """
    text = scrub(str(exc))
    if isinstance(exc, PermissionError) or any(m in text for m in auth_markers):
        return AuthError(f"source {uri}: {where}: access denied by {service} ({text}); "
                         "check the credentials secret", source=uri, file=path, status=403)
    if isinstance(exc, FileNotFoundError):
        return SourceError(f"source {uri}: {where}: not found", source=uri, file=path,
                           status=404)
    if isinstance(exc, (ValueError, TypeError)):
        return SourceError(f"source {uri}: {where}: {text}", source=uri, file=path)
    return transport_error(exc, where)


def transport_error(exc: BaseException, where: str) -> RetryableError:
    """A failure worth another attempt (refused, reset, timed out, cut short, a 5xx),
    which resumes where this one stopped; the message is scrubbed of secrets."""
    return RetryableError(f"{where}: {type(exc).__name__}: {scrub(str(exc))}")


def fsspec_fetcher(fs: Any, key: str, path: str, block_bytes: int,
                   classify: Callable[[BaseException, str, str], BaseException]) -> Fetch:
    """A :data:`Fetch` over an fsspec filesystem (s3fs, gcsfs): ranged ``cat_file`` reads
    of at most ``block_bytes``, failures mapped by ``classify(exc, where, path)``."""

    def fetch(start: int, end: int) -> Iterator[bytes]:
        pos = start
        while pos < end:
            stop = min(pos + block_bytes, end)
            try:
                block = fs.cat_file(key, start=pos, end=stop)
            except Exception as e:
                raise classify(e, f"reading {path}", path) from None
            if not block:
                return
            yield block
            pos += len(block)

    return fetch


STREAM_BLOCK_BYTES = 1024 * 1024


class AsyncBody(Protocol):
    """A response body read on an event loop (aiobotocore's StreamingBody, or any
    response adapted): ``read(n)`` returns at most ``n`` bytes, ``b""`` at the end."""

    async def read(self, n: int) -> bytes: ...
    def close(self) -> None: ...


# Blocks a response may be read ahead of the thread consuming it.
READ_AHEAD_BLOCKS = 4


class _ConsumerGone(Exception):
    pass


_END = object()


class _Handoff:
    """Blocks from a coroutine on an event loop to one thread, at most ``depth`` ahead.

    Each side blocks only when it must (the thread on empty, the coroutine on full) and
    only then is it woken by the other, so a steady stream costs no cross-thread wake-up
    per block: on two shared cores those wake-ups (GIL hand-offs included) cost more than
    the hashing.
    """

    def __init__(self, loop: Any, depth: int) -> None:
        self.loop = loop
        self.depth = depth
        self.items: collections.deque[Any] = collections.deque()
        self.cond = threading.Condition()
        self.producer_wake: Any = None  # an asyncio.Event while the coroutine waits
        self.gone = False

    async def put(self, item: Any) -> None:
        import asyncio

        while True:
            with self.cond:
                if self.gone:
                    raise _ConsumerGone
                if len(self.items) < self.depth:
                    self.items.append(item)
                    self.cond.notify()
                    return
                self.producer_wake = wake = asyncio.Event()
            await wake.wait()

    def get(self) -> Any:
        with self.cond:
            while not self.items:
                self.cond.wait()
            item = self.items.popleft()
            wake, self.producer_wake = self.producer_wake, None
        if wake is not None:
            self.loop.call_soon_threadsafe(wake.set)
        return item

    def close(self) -> None:
        with self.cond:
            self.gone = True
            wake, self.producer_wake = self.producer_wake, None
        if wake is not None:
            self.loop.call_soon_threadsafe(wake.set)


def loop_stream_fetcher(loop: Any, open_body: Callable[[int, int], Awaitable[AsyncBody]],
                        classify: Callable[[BaseException], BaseException],
                        block_bytes: int = STREAM_BLOCK_BYTES) -> Fetch:
    """A :data:`Fetch` streaming one ranged response per call from an fsspec filesystem's
    event loop (s3fs: aiobotocore signs and sends the request), in blocks of about
    ``block_bytes``. Sources that can send a plain HTTP request read on blocking sockets
    instead (:mod:`bdn.sources.http_range`), which costs less CPU per byte.

    One request per range, read as a stream: not one request per block (object stores
    bill and throttle per request, and some compatible servers read the whole object for
    every ranged GET), and not the whole range gathered in memory (a fresh large buffer
    costs a page fault per 4 KiB). A coroutine on the loop reads the response up to
    ``READ_AHEAD_BLOCKS`` blocks ahead of the calling thread (see :class:`_Handoff`), so
    the network keeps flowing while the caller hashes and writes. Failures are mapped by
    ``classify``.
    """
    import asyncio

    async def read_block(body: AsyncBody, n: int) -> tuple[bytes, Exception | None]:
        # aiohttp hands over whatever has arrived (often 64 KiB); gather a block so the
        # caller's per-block work (hash, write: GIL round trips) is paid per block. What
        # arrived before a failure is handed on too, so a resume loses nothing.
        pieces = []
        failure: Exception | None = None
        try:
            while n > 0:
                piece = await body.read(n)
                if not piece:
                    break
                pieces.append(piece)
                n -= len(piece)
        except Exception as e:
            failure = e
        return (pieces[0] if len(pieces) == 1 else b"".join(pieces)), failure

    async def pump(start: int, end: int, handoff: _Handoff) -> None:
        body: AsyncBody | None = None
        try:
            body = await open_body(start, end)
            pos = start
            while pos < end:
                block, failure = await read_block(body, min(block_bytes, end - pos))
                if block:
                    await handoff.put(block)
                    pos += len(block)
                if failure is not None:
                    raise failure
                if not block:
                    break
            await handoff.put(_END)
        except _ConsumerGone:
            pass
        except Exception as e:
            with contextlib.suppress(_ConsumerGone):
                await handoff.put(e)
        finally:
            if body is not None:
                with contextlib.suppress(Exception):
                    body.close()

    def fetch(start: int, end: int) -> Iterator[bytes]:
        if start >= end:
            return
        handoff = _Handoff(loop, READ_AHEAD_BLOCKS)
        running = asyncio.run_coroutine_threadsafe(pump(start, end, handoff), loop)
        try:
            while True:
                item = handoff.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise classify(item) from None
                yield item
        finally:
            handoff.close()
            running.cancel()

    return fetch
