"""Safe parsing of safetensors headers — shared by the chunk planner and the loader.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON + the tensor data.
The header comes from whoever produced the file, so nothing in it is trusted: the length
is bounded before any read of that size, the JSON must be an object, every dtype must be
known, every byte length must equal ``numel × dtype size`` (computed with the
reference's 64-bit overflow checks), and every tensor must lie inside the file without
overlapping another. All of this is checked on the header bytes alone, before any
allocation sized by the header.

Strict parsing (the default) accepts exactly what the reference parser (the
``safetensors`` package) accepts — a test feeds a corpus of crafted headers to both:
the tensors tile the data section from offset 0 with no gap and no trailing byte.
Like the reference (serde into a map), a tensor name given twice keeps its *last* entry;
``__metadata__`` given twice, or a field given twice inside one tensor entry, is an
error; fields a tensor entry does not define are ignored. The chunk planner parses with
``strict=False``: it only needs the tensors' boundaries, and a file the loader would
refuse is still mirrored byte for byte.

This module is pure: it takes bytes and a file size and returns records.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from manifests.errors import SafetensorsError

PREFIX_BYTES = 8
# The reference computes sizes in usize (64 bits) and refuses a shape whose product
# overflows it, even when a later dimension is 0.
MAX_USIZE = 2**64 - 1
# The reference implementation refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1000 * 1000
METADATA_KEY = "__metadata__"

# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor's record; ``begin``/``end`` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A validated header. ``tensors`` are sorted by ``begin``."""

    header_bytes: int  # N, the JSON length
    data_start: int  # 8 + N: absolute offset of the data section
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None
    file_size: int

    @property
    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def header_length(prefix: bytes, file_size: int, *, path: str = "",
                  max_header_bytes: int = MAX_HEADER_BYTES) -> int:
    """Validate the 8-byte prefix and return N, the JSON header length.

    Call this before reading N bytes: it refuses lengths past the file or the bound.
    """
    if file_size < PREFIX_BYTES or len(prefix) < PREFIX_BYTES:
        raise SafetensorsError(f"file of {file_size} bytes is too short for the 8-byte "
                               "header length", path=path, offset=0)
    n: int = struct.unpack("<Q", bytes(prefix[:PREFIX_BYTES]))[0]
    if n > max_header_bytes:
        raise SafetensorsError(f"header length {n} exceeds the limit of {max_header_bytes} "
                               "bytes", path=path, offset=0)
    if PREFIX_BYTES + n > file_size:
        raise SafetensorsError(f"header length {n} runs past the end of the "
                               f"{file_size}-byte file", path=path, offset=0)
    if n < 2:
        raise SafetensorsError(f"header length {n} is too short for a JSON object",
                               path=path, offset=0)
    return n


class _Object(dict[str, Any]):
    """A JSON object that remembers which keys it saw more than once (the last value
    wins, as in the reference), so the caller can refuse duplicates where the reference
    does: ``__metadata__`` and the fields of a tensor entry."""

    duplicates: frozenset[str] = frozenset()


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    out = _Object(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                repeated.add(k)
            seen.add(k)
        out.duplicates = frozenset(repeated)
    return out


def _valid_text(text: str) -> bool:
    """Whether ``text`` is valid Unicode: JSON ``\\ud800`` escapes decode to lone
    surrogates, which Python accepts and the reference refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_header(head: bytes | memoryview, file_size: int, *, path: str = "",
                 max_header_bytes: int = MAX_HEADER_BYTES,
                 strict: bool = True) -> SafetensorsHeader:
    """Parse and validate a header from ``head`` (the file's first 8 + N bytes, or more).

    ``strict`` (the default, as the reference reader) also requires the tensors to tile
    the data section: the first at offset 0, no gap, no byte after the last. With
    ``strict=False`` (the chunk planner) only overlaps and overruns are refused.
    """
    n = header_length(bytes(head[:PREFIX_BYTES]), file_size, path=path,
                      max_header_bytes=max_header_bytes)
    if len(head) < PREFIX_BYTES + n:
        raise SafetensorsError(f"need {PREFIX_BYTES + n} header bytes, got {len(head)}",
                               path=path, offset=len(head))
    raw = bytes(head[PREFIX_BYTES:PREFIX_BYTES + n])
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_object)
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"header is not valid UTF-8 ({e.reason})", path=path,
                               offset=PREFIX_BYTES + e.start) from None
    except json.JSONDecodeError as e:
        raise SafetensorsError(f"header is not valid JSON: {e.msg}", path=path,
                               offset=PREFIX_BYTES + e.pos) from None
    except (ValueError, RecursionError) as e:
        raise SafetensorsError(f"header is not valid JSON: {e}", path=path,
                               offset=PREFIX_BYTES) from None
    if not isinstance(doc, dict):
        raise SafetensorsError("header JSON is not an object", path=path, offset=PREFIX_BYTES)
    if METADATA_KEY in doc.duplicates:  # type: ignore[attr-defined]
        raise SafetensorsError(f"duplicate key {METADATA_KEY!r}", path=path,
                               offset=PREFIX_BYTES)

    data_start = PREFIX_BYTES + n
    data_size = file_size - data_start
    metadata = doc.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
                isinstance(v, str) and _valid_text(k) and _valid_text(v)
                for k, v in metadata.items()):
            raise SafetensorsError("__metadata__ must map strings to strings", path=path,
                                   offset=PREFIX_BYTES)

    tensors: list[TensorInfo] = []
    for name, entry in doc.items():
        tensors.append(_parse_entry(name, entry, data_start, data_size, path))
    tensors.sort(key=lambda t: (t.begin, t.end))

    prev: TensorInfo | None = None
    cursor = data_start
    for t in tensors:
        if prev is not None and t.begin < prev.end:
            raise SafetensorsError(f"overlaps tensor {prev.name!r} (which ends at byte "
                                   f"{prev.end})", path=path, tensor=t.name, offset=t.begin)
        if strict and t.begin != cursor:
            what = "does not start at offset 0 of the data section" if cursor == data_start \
                else f"leaves a gap: previous data ends at byte {cursor}"
            raise SafetensorsError(what, path=path, tensor=t.name, offset=t.begin)
        if t.nbytes:
            prev = t
        cursor = max(cursor, t.end)
    if strict and cursor != file_size:
        last = f"the last tensor ({tensors[-1].name!r})" if tensors else "the header"
        raise SafetensorsError(f"{file_size - cursor} trailing bytes after {last}: the data "
                               f"section must end at the end of the file", path=path,
                               offset=cursor)
    return SafetensorsHeader(header_bytes=n, data_start=data_start, tensors=tuple(tensors),
                             metadata=metadata, file_size=file_size)


def _parse_entry(name: str, entry: Any, data_start: int, data_size: int,
                 path: str) -> TensorInfo:
    def fail(msg: str, offset: int | None = None) -> SafetensorsError:
        return SafetensorsError(msg, path=path, tensor=name, offset=offset)

    if not isinstance(entry, dict):
        raise fail("entry is not a JSON object")
    if not _valid_text(name):
        raise fail("name is not valid Unicode (a lone surrogate escape)")
    if isinstance(entry, _Object) and entry.duplicates:
        raise fail(f"duplicate field(s) {sorted(entry.duplicates)}")
    # Other fields are ignored, as the reference ignores them.
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise fail(f"unknown dtype {_brief(dtype)}; known: {', '.join(DTYPE_BITS)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
            type(d) is int and d >= 0 for d in shape):
        raise fail(f"shape must be a list of non-negative integers, got {_brief(shape)}")
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int for o in offsets)):
        raise fail(f"data_offsets must be two integers, got {_brief(offsets)}")
    begin, end = offsets
    if begin < 0 or end < begin:
        raise fail(f"data_offsets [{begin}, {end}] are not an increasing range",
                   data_start + max(begin, 0))
    if end > data_size:
        raise fail(f"data_offsets end {end} lies past the end of the data section "
                   f"({data_size} bytes)", data_start + begin)
    numel = 1
    for d in shape:  # left to right, as the reference's checked multiplication
        numel *= d
        if numel > MAX_USIZE:
            raise fail(f"shape {_brief(shape)} overflows: the product of its dimensions "
                       "exceeds 2^64 - 1", data_start + begin)
    bits = numel * DTYPE_BITS[dtype]
    if bits > MAX_USIZE:
        raise fail(f"shape {_brief(shape)} of {dtype} overflows: its size in bits exceeds "
                   "2^64 - 1", data_start + begin)
    if bits % 8:
        raise fail(f"{numel} elements of {dtype} do not fill whole bytes", data_start + begin)
    if end - begin != bits // 8:
        raise fail(f"byte length {end - begin} does not match shape {_brief(shape)} of {dtype} "
                   f"({bits // 8} bytes)", data_start + begin)
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape),
                      begin=data_start + begin, end=data_start + end)


def _brief(value: Any) -> str:
    """A ``repr`` cut short: a header can hold a million-element shape."""
    text = repr(value)
    return text if len(text) <= 120 else text[:120] + "…"
