"""Stream a remote file straight into its chunks: parallel ranged requests whose bytes go
from the socket into the chunk that owns them, block by block. No spool file, no
whole-chunk buffers.

Why this shape: spooling a remote file and then chunking it writes every byte into fresh
page-cache pages twice (spool, then object) and reads it back twice (checksum, BLAKE3);
gathering whole chunks in memory instead costs a page fault per 4 KiB of every fresh
buffer. Here each block (≤ 1 MiB, recycled by the allocator, still in the CPU cache) is
hashed and written once, as it arrives, which is what a plain download costs plus the
hashing (measurements: bench/README.md).

How:

* **Parts** are runs of whole chunks of about ``part_bytes`` (the first may begin inside
  a chunk whose head a header probe already fetched); each part is one request, so every
  chunk is fed by exactly one connection, in order. A part is retried under the shared
  :class:`~bdn.retry.RetryPolicy` and *resumed* from its first missing byte, so a
  dropped connection costs only what was in flight.
* **Sinks.** ``open_chunk(offset, length)`` gives a :class:`ChunkSink` that receives the
  chunk's bytes in order and stores the chunk on ``finish`` (the mirror's sink hashes
  with BLAKE3 and writes into the store as bytes arrive).
* **Source checksum.** A CRC (S3, GCS) is computed per chunk on the receiving thread and
  the chunks' CRCs are combined at the end (:mod:`bdn.transfer.crc`). Other digests (LFS
  sha256, MD5) need the bytes in file order: a chunk that starts when every earlier
  chunk is hashed is hashed *live*, block by block; any other is hashed later from its
  sink's ``read_back`` (a page-cache read for a local store), by whichever thread moves
  the frontier up to it. A part starts only within a window (``concurrency ×
  part_bytes``, at least 64 MiB) of that frontier, which bounds how many finished chunks
  wait for their turn.
* **Limits.** Every request holds one slot of each semaphore in ``request_slots`` (the
  source's cap across its files, the mirror service's global cap across jobs).

**Resume.** ``on_chunk`` hears of every chunk stored (with its CRC when the checksum is
one); a later attempt passes those as ``landed`` and they are not fetched again. The
source checksum still covers them: by the recorded CRC, or by reading the stored chunk
back (other digests).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Protocol

from bdn.errors import SourceError
from bdn.transfer.cancel import CancelToken
from bdn.transfer.crc import CrcKind
from bdn.transfer.files import Checksum, Fetch, FetchCounters, Hasher, SourceFile
from bdn.transfer.options import DownloadOptions
from bdn.transfer.ranged import fetch_resumable

# Parts may run this far ahead of the first chunk not yet checksummed, at least.
MIN_WINDOW_BYTES = 64 * 1024 * 1024


class ChunkSink(Protocol):
    """Where one chunk's bytes go as they arrive."""

    def write(self, data: memoryview) -> None: ...
    def finish(self) -> None: ...
    def read_back(self) -> Iterator[bytes | memoryview]: ...
    def close(self) -> None: ...


OpenChunk = Callable[[int, int], ChunkSink]


class _Stopped(Exception):
    """Another part failed or the mirror was cancelled: stop quietly."""


@dataclass(frozen=True)
class Part:
    """One request: bytes ``[start, end)``, feeding chunks ``first`` to ``stop - 1``."""

    start: int
    end: int
    first: int
    stop: int


def plan_parts(spans: Sequence[tuple[int, int]], have: int, part_bytes: int,
               landed: Container[int] = frozenset()) -> list[Part]:
    """Runs of whole chunks of about ``part_bytes`` covering ``[have, size)``, except the
    chunks in ``landed``; ``spans`` tile the file. A run ends once it reaches
    ``part_bytes``, or before a chunk that would take it past ``part_bytes`` when it
    already holds half of that; a chunk larger than ``part_bytes`` is a part alone.

    Why not simply "at least ``part_bytes``": the first run starts inside a chunk whose
    head the header probe fetched, falls just short, and swallowed the next chunk whole.
    With 16 MiB tensor pieces and 32 MiB parts that made a file's parts 48 + 16 MiB,
    and where each connection is capped the longest part sets the file's time."""
    parts: list[Part] = []
    run: list[int] = []
    run_bytes = 0

    def close() -> None:
        nonlocal run_bytes
        if run:
            last = spans[run[-1]]
            parts.append(Part(max(have, spans[run[0]][0]), last[0] + last[1], run[0],
                              run[-1] + 1))
            run.clear()
            run_bytes = 0

    for i, (off, length) in enumerate(spans):
        if off + length <= have:
            continue
        if i in landed:
            close()
            continue
        length = off + length - max(have, off)
        if run and run_bytes + length > part_bytes and 2 * run_bytes >= part_bytes:
            close()
        run.append(i)
        run_bytes += length
        if run_bytes >= part_bytes:
            close()
    close()
    return parts


@dataclass(frozen=True)
class Landed:
    """A chunk an earlier, interrupted attempt already stored: not fetched again. The
    source checksum takes its recorded ``crc`` (a CRC checksum) or its bytes from
    ``read_back`` (any other digest)."""

    crc: int | None
    read_back: Callable[[], Iterable[bytes | memoryview]]

    def close(self) -> None:
        """Nothing to release (a :class:`Replayable`, like a finished sink)."""


class Replayable(Protocol):
    """A stored chunk whose bytes the in-order checksum can read again."""

    def read_back(self) -> Iterable[bytes | memoryview]: ...
    def close(self) -> None: ...


_PENDING, _LIVE, _STREAMING, _DONE, _HASHED = range(5)


@dataclass
class _Order:
    """The source checksum over chunks that finish in any order.

    A CRC (the checksum's ``crc`` set) is computed per chunk as its bytes arrive and the
    chunks' CRCs are combined at the end: nothing waits, nothing is read back. Any other digest runs
    over the file in order: live for a chunk that starts at the frontier, from the
    sink's ``read_back`` for one that finished ahead of it.
    """

    spans: Sequence[tuple[int, int]]
    checksum: Checksum | None
    window_bytes: int
    on_chunk: Callable[[int, int | None], None] | None = None
    crc: CrcKind | None = field(init=False)
    hasher: Hasher | None = field(init=False)
    crcs: list[int] = field(init=False)
    state: list[int] = field(init=False)
    frontier: int = 0  # index of the first chunk not yet hashed (in-order mode)
    done: dict[int, Replayable] = field(default_factory=dict)
    draining: bool = False
    failed: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.state = [_PENDING] * len(self.spans)
        self.crcs = [0] * len(self.spans)
        c = self.checksum
        self.crc = c.crc if c is not None else None
        self.hasher = c.new() if c is not None and c.crc is None else None

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def wait_window(self, start: int) -> None:
        """Block until a part starting at ``start`` is within the window."""
        if self.hasher is None:
            return
        with self.cond:
            while not self.failed:
                if self.frontier >= len(self.spans):
                    return
                off, length = self.spans[self.frontier]
                if start < off + length + self.window_bytes:
                    return
                self.cond.wait()
        raise _Stopped

    def begin(self, i: int) -> None:
        """Chunk ``i`` starts arriving."""
        if self.hasher is not None:
            with self.cond:
                self.state[i] = _LIVE if i == self.frontier else _STREAMING

    def update(self, i: int, data: memoryview) -> None:
        """The next bytes of chunk ``i``, in order."""
        if self.crc is not None:
            self.crcs[i] = self.crc.extend(self.crcs[i], data)
        elif self.hasher is not None and self.state[i] == _LIVE:
            self.hasher.update(data)

    def land(self, i: int, landed: Landed) -> bool:
        """Take chunk ``i`` as stored by an earlier attempt; False when the checksum
        cannot be had without fetching it (a CRC that was not recorded)."""
        if self.crc is not None:
            if landed.crc is None:
                return False
            self.crcs[i] = landed.crc
        elif self.hasher is not None:
            with self.cond:
                self.state[i] = _DONE
                self.done[i] = landed
        return True

    def end(self, i: int, sink: ChunkSink) -> None:
        """Chunk ``i`` is complete and stored; ``sink`` is closed once it is hashed."""
        if self.on_chunk is not None:
            self.on_chunk(i, self.crcs[i] if self.crc is not None else None)
        if self.hasher is None:
            sink.close()
            return
        with self.cond:
            if self.state[i] == _LIVE:
                self.state[i] = _HASHED
                self.frontier = i + 1
                sink.close()
            else:
                self.state[i] = _DONE
                self.done[i] = sink
        self.kick()

    def kick(self) -> None:
        """Hash what waits at the frontier, unless another thread is doing it."""
        if self.hasher is None:
            return
        with self.cond:
            if self.draining:
                self.cond.notify_all()
                return
            self.draining = True
        try:
            self._drain()
        finally:
            with self.cond:
                self.draining = False
                self.cond.notify_all()

    def _drain(self) -> None:
        """Hash finished chunks at the frontier from their sinks, as far as they go."""
        assert self.hasher is not None
        while True:
            with self.cond:
                self.cond.notify_all()
                i = self.frontier
                if self.failed or i >= len(self.spans) or self.state[i] != _DONE:
                    return
                sink = self.done.pop(i)
            try:
                for block in sink.read_back():
                    self.hasher.update(block)
            finally:
                sink.close()
            with self.cond:
                self.state[i] = _HASHED
                self.frontier = i + 1

    def result(self) -> str | None:
        """The checksum of the whole file, once every chunk has ended."""
        if self.crc is not None:
            crc = 0
            for (_, length), part in zip(self.spans, self.crcs, strict=True):
                crc = self.crc.combine(crc, part, length)
            return self.crc.b64(crc)
        if self.hasher is None:
            return None
        if self.frontier != len(self.spans):  # pragma: no cover - every chunk ended
            return None
        return self.hasher.hexdigest()

    def close_all(self) -> None:
        with self.cond:
            sinks, self.done = list(self.done.values()), {}
        for sink in sinks:
            sink.close()


def stream_file(*, source_uri: str, file: SourceFile, spans: Sequence[tuple[int, int]],
                prefix: bytes, fetch: Fetch, open_chunk: OpenChunk,
                options: DownloadOptions, counters: FetchCounters,
                counter_lock: threading.Lock, checksum: Checksum | None = None,
                cancel: CancelToken | None = None,
                request_slots: Sequence[threading.Semaphore] = (),
                landed: Mapping[int, Landed] | None = None,
                on_chunk: Callable[[int, int | None], None] | None = None) -> None:
    """Fetch ``file`` into one sink per chunk of ``spans``; ``prefix`` holds bytes
    ``[0, len(prefix))`` already fetched. ``landed``: chunks (by index) stored by an
    earlier attempt, not fetched again; ``on_chunk(index, crc)`` is told of each chunk
    stored now (its CRC when the checksum is one), for a later attempt to resume from.
    Raises :class:`SourceError` naming the source and file when the bytes cannot be had
    or fail the source's checksum."""
    ends = [0] + [off + length for off, length in spans]
    if ends[-1] != file.size or any(off != end for (off, _), end in zip(spans, ends,
                                                                         strict=False)):
        raise ValueError(f"chunk spans of {file.path} do not tile its {file.size} bytes")
    verify = checksum if options.verify else None
    order = _Order(spans, verify,
                   max(options.concurrency * options.part_bytes, MIN_WINDOW_BYTES), on_chunk)
    have = min(len(prefix), file.size)
    head = memoryview(prefix)[:have]
    skip = {i for i, chunk in (landed or {}).items() if order.land(i, chunk)}
    parts = plan_parts(spans, have, options.part_bytes, skip)
    try:
        order.kick()
        # Chunks the probe fetched whole are stored right here.
        for i, (off, length) in enumerate(spans):
            if off + length > have:
                break
            if i not in skip:
                _feed_whole(order, i, open_chunk(off, length), head[off:off + length])
        if parts:
            _run_parts(parts, source_uri=source_uri, file=file, spans=spans, head=head,
                       fetch=fetch, open_chunk=open_chunk, options=options,
                       counters=counters, counter_lock=counter_lock, order=order,
                       cancel=cancel, request_slots=request_slots)
    finally:
        order.close_all()
    if verify is not None and order.result() != verify.expected_hex:
        raise SourceError(f"{file.path} from {source_uri}: downloaded bytes do not match the "
                          f"source's {verify.kind} checksum (the object changed during the "
                          "mirror, or the origin served corrupt data)",
                          source=source_uri, file=file.path)


def _feed_whole(order: _Order, i: int, sink: ChunkSink, data: memoryview) -> None:
    try:
        order.begin(i)
        sink.write(data)
        order.update(i, data)
        sink.finish()
    except BaseException:
        sink.close()
        raise
    order.end(i, sink)


def _run_parts(parts: list[Part], *, source_uri: str, file: SourceFile,
               spans: Sequence[tuple[int, int]], head: memoryview, fetch: Fetch,
               open_chunk: OpenChunk, options: DownloadOptions, counters: FetchCounters,
               counter_lock: threading.Lock, order: _Order, cancel: CancelToken | None,
               request_slots: Sequence[threading.Semaphore]) -> None:
    def run_part(part: Part) -> None:
        order.wait_window(part.start)
        i = part.first
        sink: ChunkSink | None = None

        def feed(pos: int, data: bytes) -> None:
            nonlocal i, sink
            block = memoryview(data)
            while block:
                off, length = spans[i]
                if sink is None:
                    sink = open_chunk(off, length)
                    order.begin(i)
                    if off < pos:  # the chunk's head came with the header probe
                        sink.write(head[off:pos])
                        order.update(i, head[off:pos])
                take = min(off + length - pos, len(block))
                piece = block if take == len(block) else block[:take]
                sink.write(piece)
                order.update(i, piece)
                pos += take
                block = block[take:]
                if pos == off + length:
                    done, sink = sink, None
                    done.finish()
                    order.end(i, done)
                    i += 1

        def stopped() -> None:
            if order.failed:
                raise _Stopped

        try:
            fetch_resumable(fetch, part.start, part.end, feed, source_uri=source_uri,
                            file=file, options=options, counters=counters,
                            counter_lock=counter_lock, cancel=cancel,
                            request_slots=request_slots, check=stopped)
        finally:
            if sink is not None:
                sink.close()  # a chunk cut short: nothing of it is kept

    with ThreadPoolExecutor(min(options.concurrency, len(parts)),
                            thread_name_prefix="bdn-part") as pool:
        futures = [pool.submit(run_part, p) for p in parts]
        for fut in as_completed(futures):
            if fut.exception() is not None:
                # Stop the other parts at their next block instead of finishing
                # downloads nobody will use.
                order.fail()
                for f in futures:
                    f.cancel()
                break
    errors = [f.exception() for f in futures if not f.cancelled()]
    real = [e for e in errors if e is not None and not isinstance(e, _Stopped)]
    if real:
        raise real[0]
    if any(e is not None for e in errors):
        raise _Stopped  # pragma: no cover - a stop always has a cause
