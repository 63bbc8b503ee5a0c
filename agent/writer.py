"""Writing one file of the node cache: preallocated partial file, chunk by chunk.

Every method here is blocking and meant for a worker thread (``os.pwrite``,
``copy_file_range`` and BLAKE3 release the GIL). The protocol for a chunk is always:
bytes land at their offset → they are verified (in memory before ``pwrite`` for network
bytes; read back after ``copy_file_range`` for local copies) → only then is the chunk
journaled in LMDB. So the journal never names bytes that were not checked, and a
``kill -9`` between any two steps loses at most the chunk in hand.

When every chunk is journaled, :meth:`FileWriter.publish` optionally re-verifies every
chunk from disk (a second line of defence against a write gone wrong), fsyncs the file
and links it into the content-addressed ``files/`` store.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import blake3

from cache.node import ChunkLocation, NodeCache, content_key
from manifests.digest import Digest
from manifests.errors import IntegrityError
from manifests.manifest import Chunk, FileEntry

SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> Callable[[int, int, int], None]:
    """``sync_file_range(fd, off, n, SYNC_FILE_RANGE_WRITE)``: start writeback, no wait.

    Python's ``os`` lacks it. Starting writeback of each chunk as it is written makes the
    fsync before publishing nearly free instead of a long stall after the last byte
    arrived (bench/README.md has the figures). A no-op where unavailable.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, off, n: None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start_writeback(fd: int, off: int, n: int) -> None:
        fn(fd, off, n, SYNC_FILE_RANGE_WRITE)  # advisory: a failure only costs fsync time
    return start_writeback


start_writeback = _load_sync_file_range()


class FileWriter:
    """The partial file of one entry. Open with :meth:`open` (may resume)."""

    def __init__(self, node: NodeCache, entry: FileEntry, fd: int, resumed: bool) -> None:
        self.node = node
        self.entry = entry
        self.fd = fd
        self.resumed = resumed
        self.key = content_key(entry)
        self.partial_path = str(node.partial_path(self.key))

    @classmethod
    def open(cls, node: NodeCache, entry: FileEntry, now: float) -> FileWriter:
        fd, resumed = node.open_partial(entry, now)
        return cls(node, entry, fd, resumed)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def write_verified(self, chunk: Chunk, data: memoryview) -> None:
        """``data`` was verified against ``chunk.digest``: write it and journal it."""
        view = data[:chunk.length]
        done = 0
        while done < chunk.length:
            done += os.pwrite(self.fd, view[done:], chunk.offset + done)
        start_writeback(self.fd, chunk.offset, chunk.length)
        self.node.mark_chunk(self.key, chunk.offset, chunk.length, chunk.digest)

    def check_on_disk(self, chunk: Chunk) -> bool:
        """Re-verify a journaled chunk's bytes (after a restart, before trusting them)."""
        try:
            _verify_range(self.fd, chunk.offset, chunk.length, chunk.digest)
        except IntegrityError:
            self.node.unmark_chunk(chunk.digest, ChunkLocation(
                self.key.hex, chunk.offset, chunk.length, partial=True))
            return False
        return True

    def copy_local(self, chunk: Chunk, loc: ChunkLocation) -> bool:
        """Copy a chunk from elsewhere on the node; True if it verified and was journaled.

        A location that turns out missing or wrong is dropped from the index, so the
        caller falls back to the network and the next plan does not choose it again.
        """
        src_path = self.node.location_path(loc)
        try:
            src = os.open(src_path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            self.node.unmark_chunk(chunk.digest, loc)
            return False
        try:
            done = 0
            while done < chunk.length:
                n = os.copy_file_range(src, self.fd, chunk.length - done, loc.offset + done,
                                       chunk.offset + done)
                if n == 0:
                    raise IntegrityError(str(chunk.digest), "<short source>",
                                         where=str(src_path))
                done += n
            _verify_range(self.fd, chunk.offset, chunk.length, chunk.digest)
        except (OSError, IntegrityError):
            self.node.unmark_chunk(chunk.digest, loc)
            return False
        finally:
            os.close(src)
        self.node.mark_chunk(self.key, chunk.offset, chunk.length, chunk.digest)
        return True

    def publish(self, now: float, *, verify_file: bool) -> Path:
        if verify_file:
            # Re-read every chunk from disk (page cache) and check it again: catches a
            # write that went wrong after its chunk was verified in memory.
            for chunk in self.entry.chunks:
                _verify_range(self.fd, chunk.offset, chunk.length, chunk.digest, whole=True)
        path = self.node.publish(self.entry, self.fd, now)
        self.close()
        return path

    def discard(self) -> None:
        self.close()
        self.node.drop_partial(self.key)


def _verify_range(fd: int, offset: int, length: int, digest: Digest, *,
                  whole: bool = False) -> None:
    """Hash ``length`` bytes of ``fd`` from ``offset`` (page cache reads) and compare."""
    # A whole file is hashed on all cores; a chunk on this thread (its callers run
    # several at once already).
    h = blake3.blake3(max_threads=blake3.blake3.AUTO if whole else 1)
    if length:
        # mmap avoids copying the bytes into Python objects; offsets must be page aligned.
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, length + (offset - start), access=mmap.ACCESS_READ,
                       offset=start) as mm, memoryview(mm) as mv:
            with contextlib.suppress(AttributeError, OSError):
                mm.madvise(mmap.MADV_SEQUENTIAL)
            h.update(mv[offset - start:])
    actual = Digest(h.hexdigest())
    if actual != digest:
        raise IntegrityError(str(digest), str(actual),
                             where=f"bytes at {offset} on disk" if whole else f"bytes at {offset}")
