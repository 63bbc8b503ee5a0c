"""The spool: a remote file downloaded by parallel ranged requests into a local file, for
files whose chunks depend on their content (FastCDC) and so cannot be streamed.

Safetensors files are streamed into the store (:mod:`bdn.transfer.stream`); other remote
files are spooled here, with retries, resume and verification:

* The file is cut into parts of ``part_bytes``; ``concurrency`` parts are fetched at once
  (one connection each), each written with ``pwrite`` at its offset into a sparse spool
  file. One TCP stream rarely fills a fast link; several do.
* A part that fails is retried and resumed from its first missing byte
  (:func:`~bdn.transfer.ranged.fetch_resumable`).
* Finished parts are recorded in a small state file next to the spool, so a mirror
  killed mid-file (service restart) resumes at the parts it lacks.
* The content is verified against the source's checksum (LFS sha256, MD5, git blob sha1)
  by a hasher thread that follows the contiguous finished prefix, so hashing overlaps the
  download instead of adding a pass after it. A spool that fails verification is deleted;
  a resumed one is refetched once from scratch (it may predate a change at the origin).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3

from bdn.errors import SourceError
from bdn.fsutil import write_json_atomic
from bdn.transfer.cancel import CancelToken
from bdn.transfer.files import Checksum, Fetch, FetchCounters, SourceFile
from bdn.transfer.options import DownloadOptions, MiB
from bdn.transfer.ranged import fetch_resumable

log = logging.getLogger(__name__)

HASH_BLOCK_BYTES = 4 * MiB
SPOOL_PREFIX = "bdn-spool-"


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



def remove_spool_later(spool_dir: Path, source_uri: str, file: SourceFile) -> None:
    """Delete a used spool off the calling thread: freeing a large file's pages takes
    tens of milliseconds."""
    _deleter().submit(remove_spool, spool_dir, source_uri, file)
