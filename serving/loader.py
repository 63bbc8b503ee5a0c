"""The safetensors loader: files on disk (or still arriving) → tensors on a device.

Entry points: :func:`load` (a dict) and :func:`iter_tensors` / :func:`open_weights` (each
tensor as soon as it is complete, in completion order). Inputs: a folder, an
``*.index.json`` or explicit files (:mod:`serving.files`).

How bytes move, by destination:

* **CPU, ``mmap``** — tensors are views of a private (copy-on-write) mapping of the file:
  no copy, and replicas on one node share the page cache. Workers populate the mapping
  in parallel (``MADV_POPULATE_READ``) so that when a tensor is yielded its pages are
  resident and mapped, not read from disk later by the first request. (When ``auto``
  finds every page of a file cached already, it skips populating: the bytes are in
  memory, and faulting page-table entries in on use costs less than populating them.)
* **CPU, ``read``** — one owned buffer per file (anonymous memory advised to use huge
  pages, since first touch of fresh 4 KiB pages is what limits a copy here) filled by
  parallel ``preadv``; tensors are views of it. Nothing is ever reused, so nothing can
  alias a recycled buffer.
* **CPU, ``direct``** — the same owned buffer, filled with ``O_DIRECT`` reads in
  block-aligned pieces that never overlap: the device writes straight into the buffer,
  skipping the page cache's copy and bookkeeping. On a cold file this is what keeps up
  with the disk (buffered reads fall behind it); on a cached one it would re-read the
  disk, so ``auto`` uses it only for files it found cold.
* **CPU, ``auto``** (the default) — measures. If a sample of the first large file is
  entirely in the page cache (``mincore``), it maps: mapping cached pages copies
  nothing, so copying cannot win. Otherwise it times both on two equal, adjacent
  samples (same cache state, same memory) — mapping, and direct reads into fresh
  memory — and uses the faster for the whole load. A file whose bytes do not all exist
  yet (still growing) is never mapped, and only complete files are read directly.
* **CUDA, ``bounce``** — each worker owns two pinned bounce buffers and a CUDA stream:
  it reads into one buffer while the other's host-to-device copy runs. A buffer is
  refilled only after the event recorded after its copy has completed, and tensors live
  in their own device allocations, so no tensor aliases a bounce buffer. Host memory is
  bounded by ``workers × 2 × bounce_buffer_bytes``. The same pipeline runs with a CPU
  destination (``strategy="bounce"``), which is how it is tested without a GPU.

Streaming: with a :class:`~serving.readiness.ReadinessSource`, every read first waits
until its byte range is verified, so tensors load while the file is still arriving.
Work is ordered by file and offset, the order in which the agent completes it.

Alignment: a tensor whose bytes are not aligned to its element size in the file (legal,
if unusual) is copied into its own allocation rather than handed out misaligned.
Byte order is the host's (little-endian, as the format specifies).
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from manifests.errors import SafetensorsError
from manifests.safetensors import MAX_HEADER_BYTES, SafetensorsHeader, TensorInfo
from serving.dtypes import TorchLayout, torch_layout
from serving.errors import ReadinessTimeout, ServingError, WeightsFileError
from serving.files import OpenedFile, WeightFiles, open_file, resolve
from serving.readiness import FilesReady, ReadinessSource

log = logging.getLogger("bdn.serving.loader")

Strategy = Literal["auto", "mmap", "read", "direct", "bounce"]
STRATEGIES: tuple[str, ...] = ("auto", "mmap", "read", "direct", "bounce")

MIB = 1 << 20
# Reads of a cold file are bound by I/O depth, not cores (bench/README.md); workers block
# in preadv/madvise with the GIL released, so more of them than cores costs little when
# warm.
DEFAULT_WORKERS = max(8, min(16, os.cpu_count() or 8))
# Per bounce buffer; two per worker. Large enough that one H2D copy amortises its launch,
# small enough that workers × 2 of them stay a modest amount of pinned memory.
BOUNCE_BUFFER_BYTES = 16 * MIB
# Unit of parallel work for reads into owned buffers and for populating mappings.
READ_CHUNK_BYTES = 16 * MIB
# The auto strategy measures this much with each method; files smaller than twice it
# are mapped (copying a small file cannot win enough to matter).
CALIBRATION_SAMPLE_BYTES = 16 * MIB
# Workers blocked on readiness wake this often to notice that the load was cancelled.
CANCEL_POLL_S = 0.25
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+
HUGE_PAGE_BYTES = 2 * MIB
PAGE_BYTES = mmap.PAGESIZE
# Residency (is a file in the page cache?) is sampled: this many windows of this size.
RESIDENCY_SAMPLES = 16
RESIDENCY_WINDOW_BYTES = 256 << 10
# O_DIRECT needs offsets, lengths and buffer addresses aligned to the device's logical
# block; 4 KiB covers every common device.
DIRECT_ALIGN_BYTES = 4096


@dataclass(frozen=True)
class LoadOptions:
    """How to load. Validated on construction; see the module docstring for strategies."""

    device: str = "cpu"
    strategy: Strategy = "auto"
    workers: int = DEFAULT_WORKERS
    bounce_buffer_bytes: int = BOUNCE_BUFFER_BYTES
    read_chunk_bytes: int = READ_CHUNK_BYTES
    # Longest wait for one byte range to become verified; None waits as long as the
    # readiness source neither fails nor finishes.
    wait_timeout_s: float | None = None
    max_header_bytes: int = MAX_HEADER_BYTES

    def __post_init__(self) -> None:
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {self.device!r} is not a torch device: {e}") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, "
                             f"got {self.strategy!r}")
        if dev.type == "cuda" and self.strategy not in ("auto", "bounce"):
            raise ValueError(f"strategy {self.strategy!r} is for CPU; CUDA loads through "
                             "bounce buffers")
        if type(self.workers) is not int or not 1 <= self.workers <= 256:
            raise ValueError(f"workers must be an integer in 1..256, got {self.workers!r}")
        for name in ("bounce_buffer_bytes", "read_chunk_bytes"):
            v = getattr(self, name)
            if type(v) is not int or not PAGE_BYTES <= v <= (1 << 34):
                raise ValueError(f"{name} must be an integer in {PAGE_BYTES}..2^34, got {v!r}")
        if self.wait_timeout_s is not None and not self.wait_timeout_s > 0:
            raise ValueError(f"wait_timeout_s must be positive or None, got "
                             f"{self.wait_timeout_s!r}")
        if type(self.max_header_bytes) is not int or self.max_header_bytes < 2:
            raise ValueError("max_header_bytes must be an integer ≥ 2")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclass
class LoadStats:
    """What a load did; ``waiting_s`` is time the load stood still waiting for bytes."""

    strategy: str = ""
    files: int = 0
    tensors: int = 0
    bytes: int = 0
    wall_s: float = 0.0
    waiting_s: float = 0.0
    calibration: dict[str, float] = field(default_factory=dict)

    @property
    def loading_s(self) -> float:
        return max(0.0, self.wall_s - self.waiting_s)


# Every finished load reports its stats here (the model server's metrics listen).
_listeners: list[Callable[[LoadStats], None]] = []


def add_stats_listener(fn: Callable[[LoadStats], None]) -> None:
    _listeners.append(fn)


def remove_stats_listener(fn: Callable[[LoadStats], None]) -> None:
    with contextlib.suppress(ValueError):
        _listeners.remove(fn)


SourceArg = str | os.PathLike[str] | list[str] | tuple[str, ...]


def load(source: SourceArg, *, readiness: ReadinessSource | None = None,
         options: LoadOptions | None = None, **overrides: Any) -> dict[str, torch.Tensor]:
    """Load every tensor into a dict (see :func:`open_weights` for the arguments)."""
    with open_weights(source, readiness=readiness, options=options, **overrides) as stream:
        return dict(stream)


def iter_tensors(source: SourceArg, *, readiness: ReadinessSource | None = None,
                 options: LoadOptions | None = None,
                 **overrides: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` as each tensor completes."""
    with open_weights(source, readiness=readiness, options=options, **overrides) as stream:
        yield from stream


def open_weights(source: SourceArg, *, readiness: ReadinessSource | None = None,
                 options: LoadOptions | None = None, **overrides: Any) -> TensorStream:
    """Start loading ``source``; iterate the result for ``(name, tensor)`` pairs.

    ``options`` or keyword overrides of :class:`LoadOptions` fields (``device=``,
    ``strategy=``, ...). ``readiness`` defaults to "every file is complete".
    """
    opts = options or LoadOptions()
    if overrides:
        opts = LoadOptions(**{**opts.__dict__, **overrides})
    return TensorStream(source, readiness or FilesReady(), opts)


# -- internals ---------------------------------------------------------------------------

@dataclass(eq=False)
class _Tensor:
    info: TensorInfo
    layout: TorchLayout
    remaining: int  # bytes not yet delivered
    dest: torch.Tensor | None = None  # raw uint8 destination (read/bounce)
    events: list[Any] = field(default_factory=list)  # CUDA events of its copies


@dataclass(eq=False)
class _File:
    opened: OpenedFile
    tensors: list[_Tensor]
    mode: str
    buf: torch.Tensor | None = None  # owned uint8 buffer (read) covering [lo, hi)
    lo: int = 0
    mm: mmap.mmap | None = None
    # CUDA: recorded on the consumer's stream after the destinations were allocated.
    # Freed memory the allocator hands out may still be read by kernels queued on that
    # stream, so copies on a worker's stream must wait for this event first.
    alloc_event: Any = None
    direct_fd: int | None = None  # the file reopened with O_DIRECT (direct)


@dataclass(eq=False)
class _Item:
    """A byte range of one file and the tensor parts inside it."""

    file: _File
    begin: int
    end: int
    parts: list[tuple[_Tensor, int, int]]  # tensor, absolute begin, absolute end


_DONE = object()


class _Activity:
    """Accounts wall time during which every busy participant waits for bytes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._busy = 0
        self._waiting = 0
        self._since: float | None = None
        self.stalled_s = 0.0

    def _update(self, dbusy: int, dwait: int) -> None:
        now = time.perf_counter()
        with self._lock:
            if self._since is not None:
                self.stalled_s += now - self._since
                self._since = None
            self._busy += dbusy
            self._waiting += dwait
            if self._busy and self._waiting == self._busy:
                self._since = now

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self._update(1, 0)
        try:
            yield
        finally:
            self._update(-1, 0)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        self._update(0, 1)
        try:
            yield
        finally:
            self._update(0, -1)


class TensorStream:
    """A running load. Iterate for ``(name, tensor)``; ``close()`` cancels and joins."""

    def __init__(self, source: SourceArg, readiness: ReadinessSource,
                 options: LoadOptions) -> None:
        self.options = options
        self.readiness = readiness
        self.stats = LoadStats()
        self.headers: dict[str, SafetensorsHeader] = {}
        self._device = options.torch_device
        self._cuda = self._device.type == "cuda"
        if self._cuda and not torch.cuda.is_available():
            raise ServingError(f"device {options.device} requested but CUDA is not available")
        self._t0 = time.perf_counter()
        self._activity = _Activity()
        # Files already complete never make the load wait; don't account tiny waits.
        self._instant = isinstance(readiness, FilesReady)
        self._stop = threading.Event()
        self._out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._files: list[_File] = []
        self._names: dict[str, str] = {}
        self._pending_total: int | None = None  # known once every header is parsed
        self._yielded = 0
        self._closed = False
        self._finished = False
        self._strategy: str | None = None if options.strategy == "auto" else options.strategy
        self._lazy_map = False  # auto found the files cached: map without populating
        if self._cuda:
            self._strategy = "bounce"
            self._consumer_stream = torch.cuda.current_stream(self._device)
        self._helpers: list[threading.Event] = []
        # Workers start with the first piece of work: a load of cached files that maps
        # them lazily needs none, and starting threads is not free on a busy machine.
        self._workers: list[threading.Event] = []
        self._planner = _spawn(self._plan, source)

    # -- consumer side --------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            while True:
                if self._pending_total is not None and self._yielded >= self._pending_total:
                    break
                msg = self._out.get()
                if msg is _DONE:
                    continue  # the planner finished; the loop condition decides
                if isinstance(msg, BaseException):
                    raise msg
                name, tensor, events = msg
                if events:
                    stream = torch.cuda.current_stream(self._device)
                    for ev in events:
                        stream.wait_event(ev)
                self._yielded += 1
                yield name, tensor
            self._finish()
        finally:
            self.close()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self.stats.wall_s = time.perf_counter() - self._t0
        self.stats.waiting_s = min(self._activity.stalled_s, self.stats.wall_s)
        self.stats.strategy = self._strategy or ""
        for fn in list(_listeners):
            try:
                fn(self.stats)
            except Exception:  # a metrics hook must never fail a load
                log.exception("load stats listener failed")

    def close(self) -> None:
        """Stop the workers (if still running), release files and buffers."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for _ in self._workers:
            self._work.put(_DONE)
        self._planner.wait()
        for w in [*self._workers, *self._helpers]:
            w.wait()
        if self._cuda:
            # Copies may still be in flight if the load was abandoned; the device memory
            # they write must not be handed to anyone else before they finish.
            torch.cuda.synchronize(self._device)
        for f in self._files:
            with contextlib.suppress(OSError):
                os.close(f.opened.fd)
            if f.direct_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(f.direct_fd)
            # Tensors keep what they view alive; the stream itself lets go, so a mapping
            # is unmapped (and its page cache evictable) once its tensors are gone.
            f.mm = None
            f.buf = None
            f.tensors = []

    def __enter__(self) -> TensorStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- planner ------------------------------------------------------------------------
    def _wait(self, fn: Callable[[float], str]) -> str:
        """Call a readiness wait in slices, so a cancelled load does not hang."""
        deadline = (None if self.options.wait_timeout_s is None
                    else time.monotonic() + self.options.wait_timeout_s)
        with (contextlib.nullcontext() if self._instant else self._activity.waiting()):
            while True:
                if self._stop.is_set():
                    raise _Cancelled()
                slice_s = CANCEL_POLL_S
                if deadline is not None:
                    slice_s = min(slice_s, max(0.0, deadline - time.monotonic()))
                try:
                    return fn(slice_s)
                except ReadinessTimeout:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise

    def _plan(self, source: SourceArg) -> None:
        try:
            with self._activity.busy():
                self._plan_files(source)
        except _Cancelled:
            pass
        except BaseException as e:
            self._fail(e)
        finally:
            for _ in self._workers:
                self._work.put(_DONE)

    def _plan_files(self, source: SourceArg) -> None:
        opts = self.options
        files: WeightFiles = resolve(
            source, _Sliced(self.readiness, self._wait), timeout_s=None)
        total = 0
        for path in files.paths:
            if self._stop.is_set():
                return
            opened = open_file(path, _Sliced(self.readiness, self._wait),
                               max_header_bytes=opts.max_header_bytes)
            with self._lock:
                self._files.append(f := _File(opened, [], mode=""))
            self.headers[path] = opened.header
            self._check_names(opened, files)
            self.stats.files += 1
            self.stats.tensors += len(opened.header.tensors)
            self.stats.bytes += sum(t.nbytes for t in opened.header.tensors)
            total += len(opened.header.tensors)
            if self._strategy is None:
                self._strategy = self._calibrate(opened)
            self._schedule(f)
        if files.weight_map is not None:
            for name, shard in files.weight_map.items():
                if name not in self._names:
                    raise WeightsFileError(f"the index maps tensor {name!r} to "
                                           f"{os.path.basename(shard)}, which does not "
                                           "contain it", path=files.index_path or "")
        with self._lock:
            self._pending_total = total
        self._out.put(_DONE)

    def _check_names(self, opened: OpenedFile, files: WeightFiles) -> None:
        for t in opened.header.tensors:
            other = self._names.get(t.name)
            if other is not None:
                raise SafetensorsError(f"tensor name also appears in {other}",
                                       path=opened.path, tensor=t.name, offset=t.begin)
            self._names[t.name] = opened.path
            if files.weight_map is not None:
                want = files.weight_map.get(t.name)
                if want is not None and want != opened.path:
                    raise SafetensorsError(f"the index puts this tensor in {want}",
                                           path=opened.path, tensor=t.name, offset=t.begin)

    def _schedule(self, f: _File) -> None:
        opened = f.opened
        mode = self._strategy or "mmap"
        if mode == "mmap" and not _mappable(opened):
            mode = "read"
        if mode == "direct":
            f.direct_fd = _open_direct(opened) if self._instant else None
            if f.direct_fd is None:
                mode = "read"
        f.mode = mode
        tensors = [_Tensor(info, torch_layout(info), info.nbytes)
                   for info in opened.header.tensors]
        f.tensors = tensors
        nonempty = [t for t in tensors if t.info.nbytes]
        if self._instant and nonempty and mode != "direct":
            # Ask the kernel to read the whole data section ahead, asynchronously: a cold
            # file then streams at the device's queue depth instead of at the pace of
            # our page faults or reads (measured here, 2 GiB cold: 6.6 s → 3.9 s). Cheap
            # when cached (a lookup, no I/O). Not for direct reads, which bypass the cache.
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(opened.fd, nonempty[0].info.begin,
                                 max(t.info.end for t in nonempty) - nonempty[0].info.begin,
                                 os.POSIX_FADV_WILLNEED)
        if mode == "mmap":
            f.mm = mmap.mmap(opened.fd, opened.size, flags=mmap.MAP_PRIVATE,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        elif mode == "read" and nonempty:
            f.lo = nonempty[0].info.begin
            f.buf = _owned_buffer(max(t.info.end for t in nonempty) - f.lo)
        elif mode == "direct" and nonempty:
            f.lo = nonempty[0].info.begin // DIRECT_ALIGN_BYTES * DIRECT_ALIGN_BYTES
            hi = _align_up(max(t.info.end for t in nonempty))
            f.buf = _owned_buffer(max(hi - f.lo, HUGE_PAGE_BYTES))[:hi - f.lo]
        elif mode == "bounce":
            for t in nonempty:
                t.dest = self._alloc_dest(t.info.nbytes)
            if self._cuda:
                f.alloc_event = torch.cuda.Event()
                f.alloc_event.record(self._consumer_stream)
        # Each file is checked: a later shard may not be cached when the first was.
        lazy = (mode == "mmap" and self._lazy_map and self._instant and f.mm is not None
                and _resident_fraction(f.mm, 0, opened.size) == 1.0)
        for t in tensors:
            if lazy or not t.info.nbytes:
                self._complete(f, t)
        if lazy:
            return
        limit = (self.options.bounce_buffer_bytes if mode == "bounce"
                 else self.options.read_chunk_bytes)
        if f.buf is not None and f.buf.numel() >= 2 * limit:
            # Fresh memory is zeroed by the kernel on first touch; done inside the
            # readers' preadv it stalls their I/O. A helper touches it ahead of them, so
            # zeroing overlaps the disk (2 GiB cold, direct: 1.31 → 1.50 GB/s here).
            self._helpers.append(_spawn(self._prefault, f.buf, _align_up(limit)))
        if not nonempty:
            return  # nothing to read (and, direct, no buffer to tile)
        items = (_split_aligned(f, nonempty, _align_up(limit)) if mode == "direct"
                 else _split(f, nonempty, limit))
        for item in items:
            if not self._workers:
                self._workers = [_spawn(self._worker, i) for i in range(self.options.workers)]
            self._work.put(item)

    def _alloc_dest(self, nbytes: int) -> torch.Tensor:
        if self._cuda:
            with torch.cuda.stream(self._consumer_stream):
                return torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        return torch.empty(nbytes, dtype=torch.uint8)

    def _calibrate(self, opened: OpenedFile) -> str:
        """Pick a CPU strategy for this load by measuring (see the module docstring)."""
        ts = [t for t in opened.header.tensors if t.nbytes]
        if not ts or not _mappable(opened):
            return "read" if ts else "mmap"
        lo, hi = ts[0].begin, max(t.end for t in ts)
        n = CALIBRATION_SAMPLE_BYTES
        if hi - lo < 2 * n:
            return "mmap"
        try:
            self._wait(lambda s: self.readiness.wait_range(opened.path, lo, lo + 2 * n,
                                                           timeout_s=s))
        except ReadinessTimeout:
            return "mmap"
        a = lo - lo % PAGE_BYTES
        t0 = time.perf_counter()
        with mmap.mmap(opened.fd, opened.size, flags=mmap.MAP_PRIVATE,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            resident = _resident_fraction(mm, a, hi - a)
            if resident == 1.0:
                # Every page is cached: mapping copies nothing, so copying cannot win; and
                # nothing needs reading, so tensors map lazily (populating page tables up
                # front measured 0.12 s for 2 GiB; faulting them in on use is cheaper).
                self.stats.calibration = {"resident": 1.0}
                self._lazy_map = True
                return "mmap"
            _populate(mm, a, n)
        t_map = time.perf_counter() - t0
        direct_fd = _open_direct(opened) if self._instant else None
        t0 = time.perf_counter()
        buf = _owned_buffer(max(n, HUGE_PAGE_BYTES))[:n]
        if direct_fd is not None:
            try:
                _pread_direct(direct_fd, memoryview(buf.numpy()), a + n, n, opened.path)
            finally:
                os.close(direct_fd)
        else:
            _pread_into(opened.fd, memoryview(buf.numpy()), a + n, opened.path)
        del buf
        t_read = time.perf_counter() - t0
        self.stats.calibration = {"resident": resident, "mmap_s": t_map, "read_s": t_read}
        # The faster wins. (A tie-break towards the mapping, which costs no memory of its
        # own, picked it on cold files here although direct reads finished 25% sooner:
        # one sample understates what parallel direct reads gain.)
        if t_read < t_map:
            return "direct" if direct_fd is not None else "read"
        return "mmap"

    def _prefault(self, buf: torch.Tensor, step: int) -> None:
        base, n = buf.data_ptr(), buf.numel()
        if base % PAGE_BYTES:
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            for off in range(0, n, step):
                if self._stop.is_set() or libc.madvise(
                        ctypes.c_void_p(base + off), ctypes.c_size_t(min(step, n - off)),
                        MADV_POPULATE_WRITE) != 0:
                    return  # cancelled, or a kernel without POPULATE_WRITE: readers fault
        except (OSError, AttributeError):
            return

    # -- workers ------------------------------------------------------------------------
    def _runs(self, item: _Item) -> Iterator[tuple[int, int, list[tuple[_Tensor, int, int]]]]:
        """Split an item into runs of parts whose bytes are verified, waiting as needed.

        With files already complete the whole item is one run. While streaming, a run
        starts with the next part (waiting for it) and takes every following part that
        is already verified, so a small tensor never waits for its neighbours' bytes.
        """
        path = item.file.opened.path
        if self._instant:
            yield item.begin, item.end, item.parts
            return
        parts = item.parts
        i = 0
        while i < len(parts):
            _, b, e = parts[i]
            self._wait(lambda s, b=b, e=e: self.readiness.wait_range(path, b, e, timeout_s=s))
            j = i + 1
            while j < len(parts) and self._covered(path, parts[j][1], parts[j][2]):
                j += 1
            yield b, parts[j - 1][2], parts[i:j]
            i = j

    def _covered(self, path: str, begin: int, end: int) -> bool:
        try:
            self.readiness.wait_range(path, begin, end, timeout_s=0)
            return True
        except ReadinessTimeout:
            return False

    def _worker(self, index: int) -> None:
        bufs: list[torch.Tensor] = []
        events: list[Any] = [None, None]
        stream = None
        turn = 0
        try:
            while True:
                item = self._work.get()
                if item is _DONE or self._stop.is_set():
                    return
                with self._activity.busy():
                    f: _File = item.file
                    fd, path = f.opened.fd, f.opened.path
                    if f.mode == "mmap":
                        assert f.mm is not None
                        for b, e, parts in self._runs(item):
                            _populate(f.mm, b, e - b)
                            self._deliver(f, parts, None)
                        continue
                    if f.mode == "read":
                        assert f.buf is not None
                        whole = memoryview(f.buf.numpy())
                        for b, e, parts in self._runs(item):
                            _pread_into(fd, whole[b - f.lo:e - f.lo], b, path)
                            self._deliver(f, parts, None)
                        continue
                    if f.mode == "direct":
                        assert f.buf is not None and f.direct_fd is not None
                        whole = memoryview(f.buf.numpy())
                        need = max(pe for _, _, pe in item.parts) - item.begin
                        _pread_direct(f.direct_fd, whole[item.begin - f.lo:item.end - f.lo],
                                      item.begin, need, path)
                        self._deliver(f, item.parts, None)
                        continue
                    if not bufs:
                        bufs = [self._bounce_buffer() for _ in range(2)]
                        if self._cuda:
                            stream = torch.cuda.Stream(self._device)
                    k = turn % 2
                    turn += 1
                    if events[k] is not None:
                        # The copy out of this buffer must finish before it is refilled.
                        events[k].synchronize()
                    staging = bufs[k][:item.end - item.begin]
                    whole = memoryview(staging.numpy())
                    for b, e, parts in self._runs(item):
                        _pread_into(fd, whole[b - item.begin:e - item.begin], b, path)
                        with (torch.cuda.stream(stream) if stream is not None
                              else contextlib.nullcontext()):
                            if stream is not None:
                                stream.wait_event(f.alloc_event)
                            for t, pb, pe in parts:
                                assert t.dest is not None
                                t.dest[pb - t.info.begin:pe - t.info.begin].copy_(
                                    staging[pb - item.begin:pe - item.begin],
                                    non_blocking=True)
                        ev = None
                        if stream is not None:
                            ev = torch.cuda.Event()
                            ev.record(stream)
                        events[k] = ev
                        self._deliver(f, parts, ev)
        except _Cancelled:
            pass
        except BaseException as e:
            self._fail(e)
        finally:
            for ev in events:
                if ev is not None:
                    ev.synchronize()

    def _bounce_buffer(self) -> torch.Tensor:
        return torch.empty(self.options.bounce_buffer_bytes, dtype=torch.uint8,
                           pin_memory=self._cuda)

    def _deliver(self, f: _File, parts: list[tuple[_Tensor, int, int]], event: Any) -> None:
        done: list[_Tensor] = []
        with self._lock:
            for t, b, e in parts:
                t.remaining -= e - b
                if event is not None:
                    t.events.append(event)
                if t.remaining == 0:
                    done.append(t)
        for t in done:
            self._complete(f, t)

    def _complete(self, f: _File, t: _Tensor) -> None:
        self._out.put((t.info.name, self._materialize(f, t), tuple(t.events)))
        t.dest = None

    def _materialize(self, f: _File, t: _Tensor) -> torch.Tensor:
        lay = t.layout
        n = t.info.nbytes
        if n == 0:
            return torch.empty(lay.shape, dtype=lay.dtype, device=self._device)
        if f.mode == "mmap":
            assert f.mm is not None
            raw = torch.frombuffer(f.mm, dtype=torch.uint8, count=n, offset=t.info.begin)
        elif f.mode in ("read", "direct"):
            assert f.buf is not None
            raw = f.buf[t.info.begin - f.lo:t.info.end - f.lo]
        else:
            assert t.dest is not None
            raw = t.dest
        if raw.data_ptr() % max(lay.itemsize, 1):
            raw = raw.clone()  # a fresh allocation is aligned for every dtype
        return raw.view(lay.dtype).reshape(lay.shape)

    def _fail(self, e: BaseException) -> None:
        self._stop.set()
        self._out.put(e)


class _Cancelled(Exception):
    pass


def _spawn(fn: Callable[..., None], *args: Any) -> threading.Event:
    """Run ``fn(*args)`` in a new thread; the returned event is set when it returns.

    ``threading.Thread.start`` waits until the new thread has run; on a busy machine
    that handshake costs several milliseconds per thread — more than loading a cached
    file of a few GiB takes (bench/README.md). ``_thread`` starts
    without waiting; the event replaces ``join``.
    """
    done = threading.Event()

    def run() -> None:
        try:
            fn(*args)
        finally:
            done.set()

    _thread.start_new_thread(run, ())
    return done


class _Sliced:
    """A readiness source whose waits go through the stream's cancellable wait."""

    def __init__(self, inner: ReadinessSource,
                 wait: Callable[[Callable[[float], str]], str]) -> None:
        self._inner = inner
        self._wait_fn = wait

    def wait_range(self, path: str, begin: int, end: int, *,
                   timeout_s: float | None = None) -> str:
        return self._wait_fn(lambda s: self._inner.wait_range(path, begin, end, timeout_s=s))

    def wait_complete(self, path: str, *, timeout_s: float | None = None) -> str:
        return self._wait_fn(lambda s: self._inner.wait_complete(path, timeout_s=s))

    def file_size(self, path: str) -> int | None:
        return self._inner.file_size(path)

    def listing(self, root: str, *, timeout_s: float | None = None) -> list[str] | None:
        out: list[list[str] | None] = []

        def call(s: float) -> str:
            out.append(self._inner.listing(root, timeout_s=s))
            return ""

        self._wait_fn(call)
        return out[-1]

    def close(self) -> None:
        self._inner.close()


def _split(f: _File, tensors: list[_Tensor], limit: int) -> Iterator[_Item]:
    """Group tensors (sorted by offset) into ranges of at most ``limit`` bytes.

    Small neighbours share a range (one read, one copy launch); a large tensor is cut
    into ``limit``-sized parts, and its last part ends its range, so that when streaming
    a tensor never waits for bytes of the next one. A gap between tensors is read only
    inside one range.
    """
    cur: _Item | None = None
    for t in tensors:
        b = t.info.begin
        split = False
        while b < t.info.end:
            if cur is not None and b - cur.begin >= limit:
                yield cur
                cur = None
                split = b > t.info.begin
            if cur is None:
                cur = _Item(f, b, b, [])
            e = min(t.info.end, cur.begin + limit)
            cur.parts.append((t, b, e))
            cur.end = e
            b = e
        if split and cur is not None:
            yield cur
            cur = None
    if cur is not None:
        yield cur


def _align_up(n: int) -> int:
    return -(-n // DIRECT_ALIGN_BYTES) * DIRECT_ALIGN_BYTES


def _split_aligned(f: _File, tensors: list[_Tensor], chunk: int) -> Iterator[_Item]:
    """Tile the data as block-aligned ranges of ``chunk`` bytes that never overlap.

    O_DIRECT transfers whole blocks, so a range reads the block it shares with its
    neighbour. If ranges overlapped, a later read could rewrite bytes of a tensor that
    was already yielded (and perhaps modified in place); tiling makes every byte of the
    buffer written exactly once.
    """
    assert f.buf is not None
    hi = f.lo + f.buf.numel()
    i = 0
    for b in range(f.lo, hi, chunk):
        e = min(b + chunk, hi)
        while i < len(tensors) and tensors[i].info.end <= b:
            i += 1
        parts = []
        j = i
        while j < len(tensors) and tensors[j].info.begin < e:
            t = tensors[j]
            lo, up = max(t.info.begin, b), min(t.info.end, e)
            if lo < up:
                parts.append((t, lo, up))
            j += 1
        if parts:
            yield _Item(f, b, e, parts)


def _open_direct(opened: OpenedFile) -> int | None:
    """The same file opened again with O_DIRECT, or None where that is not possible."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(f"/proc/self/fd/{opened.fd}", os.O_RDONLY | os.O_CLOEXEC | flag)
    except OSError:  # tmpfs and some filesystems refuse O_DIRECT
        return None


def _pread_direct(fd: int, mv: memoryview, offset: int, need: int, path: str) -> None:
    """Fill ``mv`` (block-aligned) from ``offset`` with O_DIRECT; at least ``need`` bytes.

    The last range may run past the end of the file: the read then comes back short,
    which is fine once the bytes the tensors need are in.
    """
    got = 0
    n = len(mv)
    while got < n:
        k = os.preadv(fd, [mv[got:]], offset + got)
        got += k
        if k == 0 or got % DIRECT_ALIGN_BYTES:
            break  # end of file
    if got < need:
        raise SafetensorsError(f"file ends early: needed bytes up to {offset + need}",
                               path=path, offset=offset + got)


def _mappable(opened: OpenedFile) -> bool:
    """A mapping is safe only if the bytes it exposes already exist in the file."""
    try:
        return os.fstat(opened.fd).st_size >= opened.size
    except OSError:
        return False


def _populate(mm: mmap.mmap, offset: int, length: int) -> None:
    """Fault ``[offset, offset+length)`` of a mapping in now, not on first use."""
    a = offset - offset % PAGE_BYTES
    n = min(len(mm) - a, length + (offset - a))
    if n <= 0:
        return
    try:
        mm.madvise(MADV_POPULATE_READ, a, n)
    except OSError:  # older kernel: touch one byte per page instead
        view = torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=a)
        view[::PAGE_BYTES].sum()


def _resident_fraction(mm: mmap.mmap, offset: int, length: int) -> float:
    """Share of sampled pages of ``[offset, offset+length)`` in the page cache (mincore).

    Samples ``RESIDENCY_SAMPLES`` evenly spaced windows rather than every page: asking
    about every page of 2 GiB took 70 ms here, the samples well under one. Returns -1.0
    where it cannot be asked (then the caller measures instead).
    """
    offset -= offset % PAGE_BYTES
    length = min(length, len(mm) - offset)
    if length <= 0:
        return -1.0
    window = min(RESIDENCY_WINDOW_BYTES, length)
    step = max(window, (length - window) // max(1, RESIDENCY_SAMPLES - 1))
    step -= step % PAGE_BYTES
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pages = (window + PAGE_BYTES - 1) // PAGE_BYTES
        vec = (ctypes.c_ubyte * pages)()
        anchor = ctypes.c_char.from_buffer(mm)
        try:
            base = ctypes.addressof(anchor)
            seen = resident = 0
            for start in range(offset, offset + length - window + 1, max(step, PAGE_BYTES)):
                if libc.mincore(ctypes.c_void_p(base + start), ctypes.c_size_t(window),
                                vec) != 0:
                    return -1.0
                seen += pages
                # One byte per page, bit 0 = resident (the other bits are reserved, zero).
                resident += pages - bytes(vec).count(0)
                if seen >= RESIDENCY_SAMPLES * pages:
                    break
        finally:
            del anchor  # the export would keep the mapping from closing
        return resident / seen if seen else -1.0
    except (OSError, AttributeError, TypeError, ValueError):
        return -1.0


def _owned_buffer(nbytes: int) -> torch.Tensor:
    """Fresh uint8 memory advised to use huge pages (see the module docstring)."""
    if nbytes < HUGE_PAGE_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8)
    # Private and anonymous: a shared mapping would be shmem, which THP does not cover.
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES,
                   flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError, AttributeError):
        mm.madvise(mmap.MADV_HUGEPAGE)
    base = torch.frombuffer(mm, dtype=torch.uint8)
    skew = (-base.data_ptr()) % HUGE_PAGE_BYTES
    return base[skew:skew + nbytes]


def _pread_into(fd: int, mv: memoryview, offset: int, path: str) -> None:
    got = 0
    n = len(mv)
    while got < n:
        k = os.preadv(fd, [mv[got:]], offset + got)
        if k == 0:
            raise SafetensorsError(f"file ends early: needed bytes up to {offset + n}",
                                   path=path, offset=offset + got)
        got += k

