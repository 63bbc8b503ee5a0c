"""The loader's read strategies: how the bytes of one file reach their tensors.

One class per strategy (:class:`MmapReads`, :class:`BufferedReads`, :class:`DirectReads`,
:class:`BounceReads`; what each does and when it wins is in :mod:`serving.loader`'s
docstring), behind :class:`ReadStrategy`, the interface the loader drives:

1. ``prepare(f, nonempty)`` (planner thread) sets up the file's destination: a mapping,
   an owned buffer, per-tensor device allocations. It returns True when every byte is
   in place already, so nothing is planned.
2. ``plan(f, nonempty)`` (planner thread) yields the byte ranges to read
   (:mod:`serving.plan`), each to be handed to one worker.
3. ``reader()`` (each worker, on its first range of that strategy) returns what reads a
   range: the strategy itself when it keeps no per-worker state, else a per-worker lane
   (bounce buffers and a CUDA stream are owned by one worker each, never shared).
4. ``raw(f, t)`` (when a tensor completes) is its bytes as a flat uint8 tensor.

Everything a strategy needs of the running load (waiting for verified bytes, reporting
delivered bytes, starting a helper thread, the stop flag) comes in one
:class:`LoadContext`, so a strategy never reaches into the stream; the loader keeps
choosing, threads, readiness and completion.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from manifests.safetensors import TensorInfo
from serving.dtypes import TorchLayout
from serving.files import OpenedFile
from serving.plan import (
    ReadRange,
    align_up,
    aligned_extent,
    data_extent,
    plan_aligned,
    plan_ranges,
)
from serving.rawio import (
    HUGE_PAGE_BYTES,
    map_private,
    owned_buffer,
    populate,
    pread_direct,
    pread_into,
    prefault,
    resident_fraction,
)


@dataclass(eq=False)
class LoadTensor:
    """One tensor of a running load."""

    info: TensorInfo
    layout: TorchLayout
    remaining: int  # bytes not yet delivered
    dest: torch.Tensor | None = None  # raw uint8 destination (bounce)
    events: list[Any] = field(default_factory=list)  # CUDA events of its copies

    # The planner's view (serving.plan.Extent).
    @property
    def begin(self) -> int:
        return self.info.begin

    @property
    def end(self) -> int:
        return self.info.end


@dataclass(eq=False)
class LoadFile:
    """One file of a running load and the destination its strategy set up."""

    opened: OpenedFile
    tensors: list[LoadTensor]
    reads: ReadStrategy | None = None  # chosen once its header is parsed
    buf: torch.Tensor | None = None  # owned uint8 buffer (read, direct) covering [lo, hi)
    lo: int = 0
    mm: mmap.mmap | None = None
    # CUDA: recorded on the consumer's stream after the destinations were allocated.
    # Freed memory the allocator hands out may still be read by kernels queued on that
    # stream, so copies on a worker's stream must wait for this event first.
    alloc_event: Any = None
    direct_fd: int | None = None  # the file reopened with O_DIRECT (direct)


Part = tuple[LoadTensor, int, int]  # tensor, absolute begin, absolute end
Run = tuple[int, int, list[Part]]


@dataclass(frozen=True)
class LoadContext:
    """What a strategy may use of the load that drives it.

    ``runs(f, r)`` splits a range into runs whose bytes are verified, waiting as needed;
    ``deliver(f, parts, event)`` reports bytes in place (``event``: the CUDA event after
    which they are); ``spawn_helper(fn, *args)`` runs a helper thread the load joins on
    close; ``stop`` is set when the load is cancelled or failed; ``instant``: every file
    is complete (nothing is waited for).
    """

    runs: Callable[[LoadFile, ReadRange[LoadTensor]], Iterator[Run]]
    deliver: Callable[[LoadFile, list[Part], Any], None]
    spawn_helper: Callable[..., None]
    stop: threading.Event
    instant: bool


class Reader(Protocol):
    """Reads ranges on one worker thread; ``close`` when the worker ends."""

    def read(self, f: LoadFile, r: ReadRange[LoadTensor]) -> None: ...

    def close(self) -> None: ...


class ReadStrategy(ABC):
    """How one file's bytes reach its tensors (see the module docstring)."""

    name: str = ""
    # Ask the kernel to read the data section ahead (page-cache reads only).
    readahead: bool = True

    def __init__(self, ctx: LoadContext, limit: int) -> None:
        self.ctx = ctx
        self.limit = limit  # the most bytes one range reads

    def prepare(self, f: LoadFile, nonempty: list[LoadTensor]) -> bool:
        """Set up ``f``'s destination; True when its bytes need no reading at all."""
        return False

    def plan(self, f: LoadFile, nonempty: list[LoadTensor]) -> Iterator[ReadRange[LoadTensor]]:
        return plan_ranges(nonempty, self.limit)

    @abstractmethod
    def reader(self) -> Reader:
        """What reads this strategy's ranges on one worker (made once per worker)."""

    @abstractmethod
    def raw(self, f: LoadFile, t: LoadTensor) -> torch.Tensor:
        """The tensor's bytes, complete, as a flat uint8 tensor."""


class _SharedReads(ReadStrategy):
    """A strategy that keeps no per-worker state is every worker's reader itself."""

    def reader(self) -> Reader:
        return self

    @abstractmethod
    def read(self, f: LoadFile, r: ReadRange[LoadTensor]) -> None:
        """Read range ``r`` of ``f`` and deliver its parts."""

    def close(self) -> None:
        """Nothing per worker to release."""


class MmapReads(_SharedReads):
    """Views of a private mapping; workers populate it. ``lazy``: auto found the load's
    first file wholly cached, so a file found wholly cached too is not populated."""

    name = "mmap"

    def __init__(self, ctx: LoadContext, limit: int, *, lazy: bool) -> None:
        super().__init__(ctx, limit)
        self.lazy = lazy

    def prepare(self, f: LoadFile, nonempty: list[LoadTensor]) -> bool:
        f.mm = map_private(f.opened)
        # Each file is checked: a later shard may not be cached when the first was.
        return (self.lazy and self.ctx.instant
                and resident_fraction(f.mm, 0, f.opened.size) == 1.0)

    def read(self, f: LoadFile, r: ReadRange[LoadTensor]) -> None:
        assert f.mm is not None
        for b, e, parts in self.ctx.runs(f, r):
            populate(f.mm, b, e - b)
            self.ctx.deliver(f, parts, None)

    def raw(self, f: LoadFile, t: LoadTensor) -> torch.Tensor:
        assert f.mm is not None
        return torch.frombuffer(f.mm, dtype=torch.uint8, count=t.info.nbytes,
                                offset=t.info.begin)


class _OwnedBufferReads(_SharedReads):
    """Reads into one owned buffer per file; tensors are views of it."""

    def plan(self, f: LoadFile, nonempty: list[LoadTensor]) -> Iterator[ReadRange[LoadTensor]]:
        if f.buf is not None and f.buf.numel() >= 2 * self.limit:
            # Fresh memory is zeroed by the kernel on first touch; done inside the
            # readers' preadv it stalls their I/O. A helper touches it ahead of them, so
            # zeroing overlaps the disk (2 GiB cold, direct: 1.31 → 1.50 GB/s here).
            self.ctx.spawn_helper(prefault, f.buf, align_up(self.limit), self.ctx.stop)
        return self._ranges(f, nonempty)

    def _ranges(self, f: LoadFile,
                nonempty: list[LoadTensor]) -> Iterator[ReadRange[LoadTensor]]:
        return plan_ranges(nonempty, self.limit)

    def raw(self, f: LoadFile, t: LoadTensor) -> torch.Tensor:
        assert f.buf is not None
        return f.buf[t.info.begin - f.lo:t.info.end - f.lo]


class BufferedReads(_OwnedBufferReads):
    """Parallel ``preadv`` through the page cache into the owned buffer."""

    name = "read"

    def prepare(self, f: LoadFile, nonempty: list[LoadTensor]) -> bool:
        if nonempty:
            f.lo, hi = data_extent(nonempty)
            f.buf = owned_buffer(hi - f.lo)
        return False

    def read(self, f: LoadFile, r: ReadRange[LoadTensor]) -> None:
        assert f.buf is not None
        fd, path = f.opened.fd, f.opened.path
        whole = memoryview(f.buf.numpy())
        for b, e, parts in self.ctx.runs(f, r):
            pread_into(fd, whole[b - f.lo:e - f.lo], b, path)
            self.ctx.deliver(f, parts, None)


class DirectReads(_OwnedBufferReads):
    """``O_DIRECT`` reads of block-aligned tiles into the owned buffer.

    Only for complete files (``f.direct_fd`` is opened by the loader only then), so a
    range is read whole, without waiting for readiness.
    """

    name = "direct"
    readahead = False  # direct reads bypass the page cache

    def prepare(self, f: LoadFile, nonempty: list[LoadTensor]) -> bool:
        if nonempty:
            f.lo, hi = aligned_extent(nonempty)
            f.buf = owned_buffer(max(hi - f.lo, HUGE_PAGE_BYTES))[:hi - f.lo]
        return False

    def _ranges(self, f: LoadFile,
                nonempty: list[LoadTensor]) -> Iterator[ReadRange[LoadTensor]]:
        assert f.buf is not None
        return plan_aligned(nonempty, f.lo, f.lo + f.buf.numel(), align_up(self.limit))

    def read(self, f: LoadFile, r: ReadRange[LoadTensor]) -> None:
        assert f.buf is not None and f.direct_fd is not None
        whole = memoryview(f.buf.numpy())
        need = max(pe for _, _, pe in r.parts) - r.begin
        pread_direct(f.direct_fd, whole[r.begin - f.lo:r.end - f.lo], r.begin, need,
                     f.opened.path)
        self.ctx.deliver(f, r.parts, None)


class BounceReads(ReadStrategy):
    """Reads into per-worker bounce buffers, copied into each tensor's own allocation.

    On CUDA the buffers are pinned and the copies run on the worker's own stream, so the
    read into one buffer overlaps the copy out of the other; on CPU the same pipeline
    runs with plain memory (which is how it is tested without a GPU).
    """

    name = "bounce"

    def __init__(self, ctx: LoadContext, limit: int, *, device: torch.device,
                 consumer_stream: Any = None) -> None:
        super().__init__(ctx, limit)
        self.device = device
        self.cuda = device.type == "cuda"
        # The stream the consumer was on when the load started (captured on its thread:
        # the current stream is per thread).
        self.consumer_stream = consumer_stream

    def prepare(self, f: LoadFile, nonempty: list[LoadTensor]) -> bool:
        for t in nonempty:
            t.dest = self._alloc_dest(t.info.nbytes)
        if self.cuda:
            f.alloc_event = torch.cuda.Event()
            f.alloc_event.record(self.consumer_stream)
        return False

    def _alloc_dest(self, nbytes: int) -> torch.Tensor:
        if self.cuda:
            with torch.cuda.stream(self.consumer_stream):
                return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return torch.empty(nbytes, dtype=torch.uint8)

    def reader(self) -> Reader:
        return _BounceLane(self)

    def raw(self, f: LoadFile, t: LoadTensor) -> torch.Tensor:
        assert t.dest is not None
        return t.dest


class _BounceLane:
    """One worker's two bounce buffers (and CUDA stream), used in turn."""

    def __init__(self, owner: BounceReads) -> None:
        self.owner = owner
        self.ctx = owner.ctx
        self.bufs = [self._bounce_buffer() for _ in range(2)]
        self.events: list[Any] = [None, None]
        self.stream = torch.cuda.Stream(owner.device) if owner.cuda else None
        self.turn = 0

    def _bounce_buffer(self) -> torch.Tensor:
        return torch.empty(self.owner.limit, dtype=torch.uint8, pin_memory=self.owner.cuda)

    def read(self, f: LoadFile, r: ReadRange[LoadTensor]) -> None:
        fd, path = f.opened.fd, f.opened.path
        stream = self.stream
        k = self.turn % 2
        self.turn += 1
        if self.events[k] is not None:
            # The copy out of this buffer must finish before it is refilled.
            self.events[k].synchronize()
        staging = self.bufs[k][:r.end - r.begin]
        whole = memoryview(staging.numpy())
        for b, e, parts in self.ctx.runs(f, r):
            pread_into(fd, whole[b - r.begin:e - r.begin], b, path)
            with (torch.cuda.stream(stream) if stream is not None
                  else contextlib.nullcontext()):
                if stream is not None:
                    stream.wait_event(f.alloc_event)
                for t, pb, pe in parts:
                    assert t.dest is not None
                    t.dest[pb - t.info.begin:pe - t.info.begin].copy_(
                        staging[pb - r.begin:pe - r.begin], non_blocking=True)
            ev = None
            if stream is not None:
                ev = torch.cuda.Event()
                ev.record(stream)
            self.events[k] = ev
            self.ctx.deliver(f, parts, ev)

    def close(self) -> None:
        for ev in self.events:
            if ev is not None:
                ev.synchronize()

