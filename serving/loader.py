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

Where the pieces live: this module is the entry points and :class:`TensorStream`, which
chooses a strategy per file and drives its plan with a planner thread and workers. The
plan (which byte ranges, delivering which tensor bytes) is :mod:`serving.plan`, pure;
the ``auto`` measurement is :mod:`serving.calibrate`; each strategy above is one class
in :mod:`serving.strategies`; the system calls they share are :mod:`serving.rawio`.

Alignment: a tensor whose bytes are not aligned to its element size in the file (legal,
if unusual) is copied into its own allocation rather than handed out misaligned.
Byte order is the host's (little-endian, as the format specifies).
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from manifests.errors import SafetensorsError
from manifests.safetensors import MAX_HEADER_BYTES, SafetensorsHeader
from serving.calibrate import calibrate
from serving.dtypes import torch_layout
from serving.errors import ReadinessTimeout, ServingError, WeightsFileError
from serving.files import OpenedFile, WeightFiles, open_file, resolve
from serving.plan import ReadRange, data_extent
from serving.rawio import PAGE_BYTES, mappable, open_direct
from serving.readiness import FilesReady, ReadinessSource
from serving.strategies import (
    BounceReads,
    BufferedReads,
    DirectReads,
    LoadContext,
    LoadFile,
    LoadTensor,
    MmapReads,
    Part,
    Reader,
    ReadStrategy,
    Run,
)

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
# Workers blocked on readiness wake this often to notice that the load was cancelled.
CANCEL_POLL_S = 0.25


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
    """A running load. Iterate for ``(name, tensor)``; ``close()`` cancels and joins.

    It chooses a read strategy per file (:mod:`serving.strategies`, measured by
    :mod:`serving.calibrate` for ``auto``) and drives the file's plan
    (:mod:`serving.plan`): a planner thread parses headers and queues byte ranges,
    workers read them, and completed tensors come out in completion order.
    """

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
        self._files: list[LoadFile] = []
        self._names: dict[str, str] = {}
        self._pending_total: int | None = None  # known once every header is parsed
        self._yielded = 0
        self._closed = False
        self._finished = False
        self._strategy: str | None = None if options.strategy == "auto" else options.strategy
        self._lazy_map = False  # auto found the files cached: map without populating
        self._consumer_stream: Any = None
        if self._cuda:
            self._strategy = "bounce"
            self._consumer_stream = torch.cuda.current_stream(self._device)
        self._ctx = LoadContext(runs=self._runs, deliver=self._deliver,
                                spawn_helper=self._spawn_helper, stop=self._stop,
                                instant=self._instant)
        self._reads: dict[str, ReadStrategy] = {}  # by name, made on first use
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
                self._files.append(f := LoadFile(opened, []))
            self.headers[path] = opened.header
            self._check_names(opened, files)
            self.stats.files += 1
            self.stats.tensors += len(opened.header.tensors)
            self.stats.bytes += sum(t.nbytes for t in opened.header.tensors)
            total += len(opened.header.tensors)
            if self._strategy is None:
                cal = calibrate(opened, _Sliced(self.readiness, self._wait),
                                instant=self._instant)
                self._strategy, self._lazy_map = cal.strategy, cal.lazy_map
                self.stats.calibration = dict(cal.figures)
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

    def _choose(self, f: LoadFile) -> ReadStrategy:
        """The load's strategy, or buffered reads where it cannot serve this file."""
        opened = f.opened
        mode = self._strategy or "mmap"
        if mode == "mmap" and not mappable(opened):
            mode = "read"  # still growing: a mapping would expose missing bytes
        if mode == "direct":
            f.direct_fd = open_direct(opened) if self._instant else None
            if f.direct_fd is None:
                mode = "read"
        return self._reader(mode)

    def _reader(self, name: str) -> ReadStrategy:
        reads = self._reads.get(name)
        if reads is not None:
            return reads
        opts, ctx = self.options, self._ctx
        if name == "mmap":
            reads = MmapReads(ctx, opts.read_chunk_bytes, lazy=self._lazy_map)
        elif name == "read":
            reads = BufferedReads(ctx, opts.read_chunk_bytes)
        elif name == "direct":
            reads = DirectReads(ctx, opts.read_chunk_bytes)
        elif name == "bounce":
            reads = BounceReads(ctx, opts.bounce_buffer_bytes, device=self._device,
                                consumer_stream=self._consumer_stream)
        else:  # LoadOptions admits no other name
            raise ValueError(f"no read strategy {name!r}")
        self._reads[name] = reads
        return reads

    def _schedule(self, f: LoadFile) -> None:
        opened = f.opened
        f.reads = reads = self._choose(f)
        tensors = [LoadTensor(info, torch_layout(info), info.nbytes)
                   for info in opened.header.tensors]
        f.tensors = tensors
        nonempty = [t for t in tensors if t.info.nbytes]
        if self._instant and nonempty and reads.readahead:
            # Ask the kernel to read the whole data section ahead, asynchronously: a cold
            # file then streams at the device's queue depth instead of at the pace of
            # our page faults or reads (measured here, 2 GiB cold: 6.6 s → 3.9 s). Cheap
            # when cached (a lookup, no I/O). Not for direct reads, which bypass the cache.
            lo, hi = data_extent(nonempty)
            with contextlib.suppress(OSError, AttributeError):
                os.posix_fadvise(opened.fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
        in_place = reads.prepare(f, nonempty)
        for t in tensors:
            if in_place or not t.info.nbytes:
                self._complete(f, t)
        if in_place or not nonempty:
            return  # nothing to read (and, direct, no buffer to tile)
        for r in reads.plan(f, nonempty):
            if not self._workers:
                self._workers = [_spawn(self._worker, i) for i in range(self.options.workers)]
            self._work.put((f, r))

    def _spawn_helper(self, fn: Callable[..., None], *args: Any) -> None:
        self._helpers.append(_spawn(fn, *args))

    # -- workers ------------------------------------------------------------------------
    def _runs(self, f: LoadFile, r: ReadRange[LoadTensor]) -> Iterator[Run]:
        """Split a range into runs of parts whose bytes are verified, waiting as needed.

        With files already complete the whole range is one run. While streaming, a run
        starts with the next part (waiting for it) and takes every following part that
        is already verified, so a small tensor never waits for its neighbours' bytes.
        """
        path = f.opened.path
        if self._instant:
            yield r.begin, r.end, r.parts
            return
        parts = r.parts
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
        # A strategy's reader per worker: bounce buffers are never shared between two.
        readers: dict[ReadStrategy, Reader] = {}
        try:
            while True:
                item = self._work.get()
                if item is _DONE or self._stop.is_set():
                    return
                with self._activity.busy():
                    f, r = item
                    reads = f.reads
                    reader = readers.get(reads)
                    if reader is None:
                        reader = readers[reads] = reads.reader()
                    reader.read(f, r)
        except _Cancelled:
            pass
        except BaseException as e:
            self._fail(e)
        finally:
            for reader in readers.values():
                reader.close()

    def _deliver(self, f: LoadFile, parts: list[Part], event: Any) -> None:
        done: list[LoadTensor] = []
        with self._lock:
            for t, b, e in parts:
                t.remaining -= e - b
                if event is not None:
                    t.events.append(event)
                if t.remaining == 0:
                    done.append(t)
        for t in done:
            self._complete(f, t)

    def _complete(self, f: LoadFile, t: LoadTensor) -> None:
        self._out.put((t.info.name, self._materialize(f, t), tuple(t.events)))
        t.dest = None

    def _materialize(self, f: LoadFile, t: LoadTensor) -> torch.Tensor:
        lay = t.layout
        if t.info.nbytes == 0:
            return torch.empty(lay.shape, dtype=lay.dtype, device=self._device)
        assert f.reads is not None
        raw = f.reads.raw(f, t)
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
