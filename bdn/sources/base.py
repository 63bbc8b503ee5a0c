"""The one small interface every source implements.

A mirror needs four things from an upstream: pin the revision (so later scale-ups never
see a new commit), list files with sizes and *fingerprints* (metadata that identifies
content without reading it: HF LFS sha256, S3 ETag + size, GCS md5 + size, local
device + inode + size + mtime), read a byte range, and make a file available as a
local path to chunk. Local files are used in place. Remote sources
(:class:`~bdn.sources.remote.RemoteSource`) also *stream* a file whose chunk plan is
known from its header straight into the store (:mod:`bdn.transfer.stream`); any other
remote file is spooled to a temp file by parallel ranged requests and deleted after
chunking.

The records a source hands over (:class:`SourceFile`, :class:`FetchCounters`) are the
transfer engine's (:mod:`bdn.transfer.files`), re-exported here: adapters import the
engine, never the other way round.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bdn.transfer.files import FetchCounters, SourceFile

__all__ = ["FetchCounters", "Source", "SourceFile"]


class Source(ABC):
    """An upstream of weights."""

    uri: str

    def __init__(self) -> None:
        self.counters = FetchCounters()

    @abstractmethod
    def pin(self) -> dict[str, str]:
        """Resolve the revision now; return what the manifest records (no secrets)."""

    @abstractmethod
    def list_files(self) -> list[SourceFile]:
        """All files (unfiltered), at the pinned revision."""

    @abstractmethod
    def read_range(self, file: SourceFile, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``file``."""

    @contextmanager
    def local_file(self, file: SourceFile, spool_dir: Path) -> Iterator[Path]:
        """A local path holding ``file``'s bytes for the duration of the block."""
        raise NotImplementedError
        yield spool_dir  # pragma: no cover

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
