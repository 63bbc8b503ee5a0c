"""The loader's read plan (``serving/plan.py``): pure, so checked here on generated layouts.

Layouts are tensors sorted by offset, not overlapping, not empty, with or without gaps
between them (what a validated header lists, less its empty tensors). Each property is
one the read strategies rely on: every tensor byte delivered exactly once, no range
larger than the buffer it is read into, a tensor cut into pieces ending its range,
direct reads tiling block-aligned and never overlapping.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifests.safetensors import TensorInfo
from serving.plan import (
    DIRECT_ALIGN_BYTES,
    ReadRange,
    align_up,
    aligned_extent,
    data_extent,
    plan_aligned,
    plan_ranges,
)

A = DIRECT_ALIGN_BYTES


@st.composite
def layouts(draw: st.DrawFn, *, gaps: bool = True) -> list[TensorInfo]:
    """Tensors from a data start of at least 8 (the length prefix), sizes up to 40 KiB."""
    offset = draw(st.integers(8, 3 * A))
    sizes = draw(st.lists(st.integers(1, 40_000), min_size=1, max_size=30))
    out = []
    for i, size in enumerate(sizes):
        if gaps:
            offset += draw(st.sampled_from([0, 0, 0, 1, 7, A, 20_000]))
        out.append(TensorInfo(f"t{i}", "U8", (size,), offset, offset + size))
        offset += size
    return out


limits = st.one_of(st.integers(1, 64), st.sampled_from([A, 5000, 16 << 10, 64 << 10]))


def check_exactly_once(tensors: list[TensorInfo], ranges: list[ReadRange[TensorInfo]]) -> None:
    """Every tensor byte is in exactly one part, parts lie in their range, in order."""
    pieces: dict[str, list[tuple[int, int]]] = {t.name: [] for t in tensors}
    for r in ranges:
        assert r.parts, "a range with nothing to deliver"
        prev = r.begin
        for t, b, e in r.parts:
            assert t in tensors  # the objects given, handed back
            assert t.begin <= b < e <= t.end
            assert prev <= b and e <= r.end
            prev = e
            pieces[t.name].append((b, e))
    for t in tensors:
        got = sorted(pieces[t.name])
        assert got[0][0] == t.begin and got[-1][1] == t.end, t.name
        for (_, e), (b, _) in itertools.pairwise(got):
            assert e == b, f"{t.name}: a hole or an overlap at {e}/{b}"


def check_ordered(ranges: list[ReadRange[TensorInfo]]) -> None:
    for a, b in itertools.pairwise(ranges):
        assert a.end <= b.begin


@settings(max_examples=60, deadline=None)
@given(tensors=layouts(), limit=limits)
def test_plan_ranges_delivers_every_byte_once_within_the_limit(tensors: list[TensorInfo],
                                                               limit: int) -> None:
    ranges = list(plan_ranges(tensors, limit))
    check_exactly_once(tensors, ranges)
    check_ordered(ranges)
    for r in ranges:
        # The range is what is read (gaps between its parts included): it must fit the
        # buffer it is read into.
        assert r.begin == r.parts[0][1] and r.end == r.parts[-1][2]
        assert 0 < r.end - r.begin <= limit


@settings(max_examples=60, deadline=None)
@given(tensors=layouts(), limit=limits)
def test_plan_ranges_a_cut_tensor_ends_its_range(tensors: list[TensorInfo],
                                                 limit: int) -> None:
    ranges = list(plan_ranges(tensors, limit))
    holders: dict[str, list[int]] = {}
    for i, r in enumerate(ranges):
        for t, _, _ in r.parts:
            holders.setdefault(t.name, []).append(i)
    for t in tensors:
        where = holders[t.name]
        if len(where) > 1:
            # While streaming, its last piece must not wait for the next tensor's bytes.
            last = ranges[where[-1]]
            assert last.parts[-1][0] is t and last.parts[-1][2] == t.end, t.name
    for r in ranges:
        t, _, e = r.parts[-1]
        if e < t.end:  # cut inside a tensor: only where the range is full
            assert r.end - r.begin == limit


@settings(max_examples=60, deadline=None)
@given(tensors=layouts(), limit=limits)
def test_plan_ranges_groups_small_neighbours(tensors: list[TensorInfo], limit: int) -> None:
    """A range ends early only after a tensor that was cut: otherwise it is full."""
    ranges = list(plan_ranges(tensors, limit))
    count: dict[str, int] = {}
    for r in ranges:
        for t, _, _ in r.parts:
            count[t.name] = count.get(t.name, 0) + 1
    for a, b in itertools.pairwise(ranges):
        last = a.parts[-1][0]
        assert b.begin - a.begin >= limit or count[last.name] > 1


def test_plan_ranges_examples() -> None:
    t = [TensorInfo("a", "U8", (3,), 8, 11), TensorInfo("b", "U8", (10,), 11, 21),
         TensorInfo("c", "U8", (2,), 21, 23)]
    got = [(r.begin, r.end, [(p.name, b, e) for p, b, e in r.parts])
           for r in plan_ranges(t, 4)]
    # "a" and the first byte of "b" share a range; "b" is cut and its last piece ends
    # its range, so "c" starts a new one.
    assert got == [(8, 12, [("a", 8, 11), ("b", 11, 12)]), (12, 16, [("b", 12, 16)]),
                   (16, 20, [("b", 16, 20)]), (20, 21, [("b", 20, 21)]),
                   (21, 23, [("c", 21, 23)])]
    assert [(r.begin, r.end) for r in plan_ranges(t, 100)] == [(8, 23)]
    assert list(plan_ranges([], 4)) == []


@settings(max_examples=60, deadline=None)
@given(tensors=layouts(), limit=limits)
def test_plan_aligned_tiles_blocks_without_overlap(tensors: list[TensorInfo],
                                                   limit: int) -> None:
    lo, hi = aligned_extent(tensors)
    chunk = align_up(limit)
    ranges = list(plan_aligned(tensors, lo, hi, chunk))
    check_exactly_once(tensors, ranges)
    check_ordered(ranges)
    touched = set()
    for r in ranges:
        # O_DIRECT: offsets and lengths in whole blocks; each tile of the buffer read by
        # one range only, so no read rewrites bytes of a tensor already handed out.
        assert r.begin % A == 0 and r.end % A == 0
        assert (r.begin - lo) % chunk == 0 and 0 < r.end - r.begin <= chunk
        assert lo <= r.begin and r.end <= hi
        touched.add(r.begin)
    # A tile is left out only if no tensor has a byte in it.
    for b in range(lo, hi, chunk):
        has_bytes = any(t.begin < min(b + chunk, hi) and b < t.end for t in tensors)
        assert (b in touched) == has_bytes


@given(tensors=layouts())
def test_extents_cover_the_data(tensors: list[TensorInfo]) -> None:
    lo, hi = data_extent(tensors)
    assert lo == tensors[0].begin and hi == max(t.end for t in tensors)
    alo, ahi = aligned_extent(tensors)
    assert alo % A == 0 and ahi % A == 0
    assert lo - A < alo <= lo and hi <= ahi < hi + A


def test_plan_refuses_sizes_below_one_byte() -> None:
    t = [TensorInfo("a", "U8", (3,), 8, 11)]
    with pytest.raises(ValueError, match="limit"):
        list(plan_ranges(t, 0))
    with pytest.raises(ValueError, match="chunk"):
        list(plan_aligned(t, 0, A, 0))
    with pytest.raises(ValueError, match="no tensors"):
        data_extent([])
