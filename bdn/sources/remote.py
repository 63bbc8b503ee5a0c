"""The base of every remote source (Hugging Face, S3, GCS): a source whose files are
fetched by byte range through the transfer engine (:mod:`bdn.transfer`).

A subclass says how to list, pin and fingerprint, and gives a fetcher and a checksum per
file; this class hands them to the engine — streamed into the store
(:mod:`bdn.transfer.stream`, the mirror's main path) or spooled to a local file
(:mod:`bdn.transfer.spool`) — with the source's request cap and cancel token.
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bdn.sources.base import Source, SourceFile
from bdn.transfer.cancel import AnyOf, CancelToken
from bdn.transfer.files import Checksum, Fetch
from bdn.transfer.options import DownloadOptions
from bdn.transfer.ranged import fetch_resumable
from bdn.transfer.spool import remove_spool_later, spool_file
from bdn.transfer.stream import stream_file


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
        ``on_chunk``: resuming an interrupted attempt. See :mod:`bdn.transfer.stream`."""
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
        # retried job resumes it (stale spools are swept by the mirror service).
        remove_spool_later(spool_dir, self.uri, file)

    def close(self) -> None:
        """Stop downloads still running (a partial spool stays for a resume)."""
        self._closing.set()
