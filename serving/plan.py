"""The loader's read plan: which byte ranges of a file to read, and which tensor bytes
each range delivers. Pure: tensor extents and a size in, ranges out; no I/O, no torch.

Split out of :mod:`serving.loader` so that the invariants every read strategy relies on
(each tensor byte delivered exactly once, no range larger than the buffer it is read
into, block-aligned ranges that never overlap for ``O_DIRECT``) are stated and tested
in one place (``tests/serving/test_serving_plan.py``) without files or threads.

Two planners, one per kind of read:

* :func:`plan_ranges` — ranges of at most ``limit`` bytes, cut at tensor boundaries
  where that is possible (buffered reads, mapped pages, bounce buffers).
* :func:`plan_aligned` — block-aligned tiles of a buffer that covers the data section
  (direct reads, which transfer whole blocks).

Both are generic over the tensor record: they read ``begin``/``end`` (absolute byte
offsets in the file) and hand the same objects back in the parts, so the loader plans
with its own per-tensor state and a test with plain :class:`~manifests.safetensors.TensorInfo`.
Tensors are given sorted by ``begin``, not overlapping, and not empty (as a validated
header lists them, less its empty tensors).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

# O_DIRECT needs offsets, lengths and buffer addresses aligned to the device's logical
# block; 4 KiB covers every common device.
DIRECT_ALIGN_BYTES = 4096


class Extent(Protocol):
    """What the planners read of a tensor: its absolute byte range in the file."""

    @property
    def begin(self) -> int: ...

    @property
    def end(self) -> int: ...


T = TypeVar("T", bound=Extent)


@dataclass(eq=False)
class ReadRange(Generic[T]):
    """A byte range ``[begin, end)`` of one file and the tensor parts inside it.

    ``parts`` are ``(tensor, absolute begin, absolute end)``, sorted by offset. A range
    may include bytes between tensors (a gap is read rather than split around).
    """

    begin: int
    end: int
    parts: list[tuple[T, int, int]]


def align_down(n: int) -> int:
    return n // DIRECT_ALIGN_BYTES * DIRECT_ALIGN_BYTES


def align_up(n: int) -> int:
    return -(-n // DIRECT_ALIGN_BYTES) * DIRECT_ALIGN_BYTES


def data_extent(tensors: Sequence[T]) -> tuple[int, int]:
    """``(lo, hi)``: from the first tensor's first byte to the last byte of any tensor."""
    if not tensors:
        raise ValueError("data_extent of no tensors")
    return tensors[0].begin, max(t.end for t in tensors)


def aligned_extent(tensors: Sequence[T]) -> tuple[int, int]:
    """:func:`data_extent` widened to whole ``DIRECT_ALIGN_BYTES`` blocks."""
    lo, hi = data_extent(tensors)
    return align_down(lo), align_up(hi)


def plan_ranges(tensors: Sequence[T], limit: int) -> Iterator[ReadRange[T]]:
    """Group tensors (sorted by offset) into ranges of at most ``limit`` bytes.

    Small neighbours share a range (one read, one copy launch); a large tensor is cut
    into ``limit``-sized parts, and its last part ends its range, so that when streaming
    a tensor never waits for bytes of the next one. A gap between tensors is read only
    inside one range.
    """
    if limit < 1:
        raise ValueError(f"limit must be at least 1 byte, got {limit!r}")
    cur: ReadRange[T] | None = None
    for t in tensors:
        b = t.begin
        split = False
        while b < t.end:
            if cur is not None and b - cur.begin >= limit:
                yield cur
                cur = None
                split = b > t.begin
            if cur is None:
                cur = ReadRange(b, b, [])
            e = min(t.end, cur.begin + limit)
            cur.parts.append((t, b, e))
            cur.end = e
            b = e
        if split and cur is not None:
            yield cur
            cur = None
    if cur is not None:
        yield cur


def plan_aligned(tensors: Sequence[T], lo: int, hi: int,
                 chunk: int) -> Iterator[ReadRange[T]]:
    """Tile ``[lo, hi)`` as block-aligned ranges of ``chunk`` bytes that never overlap.

    O_DIRECT transfers whole blocks, so a range reads the block it shares with its
    neighbour. If ranges overlapped, a later read could rewrite bytes of a tensor that
    was already yielded (and perhaps modified in place); tiling makes every byte of the
    buffer written exactly once. Tiles no tensor touches are left out.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 byte, got {chunk!r}")
    i = 0
    for b in range(lo, hi, chunk):
        e = min(b + chunk, hi)
        while i < len(tensors) and tensors[i].end <= b:
            i += 1
        parts = []
        j = i
        while j < len(tensors) and tensors[j].begin < e:
            t = tensors[j]
            p, q = max(t.begin, b), min(t.end, e)
            if p < q:
                parts.append((t, p, q))
            j += 1
        if parts:
            yield ReadRange(b, e, parts)
