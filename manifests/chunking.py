"""Chunk planning: where a file is cut into content-addressed chunks.

Two planners, both pure (bytes or a parsed header in, ``(offset, length)`` spans out;
spans always tile the file from offset 0 without gaps):

* **safetensors** — cuts follow the tensors, so a fine-tune that changes some tensors, or
  the same weights re-sharded, shares every other chunk with its base. The header (8-byte
  length + JSON) is one chunk. A tensor larger than ``tensor_piece_bytes`` is split into
  pieces of that size counted from the tensor's first byte, so its pieces are the same
  wherever the tensor sits. Runs of small tensors are grouped (up to
  ``group_max_bytes``; a tensor of ``small_tensor_bytes`` or more is always its own
  chunk), and a group also ends after any tensor whose *name* hashes to a
  boundary; groups therefore re-synchronise after a different shard start, which keeps a
  re-sharded model's new bytes to its headers and a few edge groups. Vectors (tensors
  of at most one dimension: norms, biases) are never grouped with matrices: they are
  what a light fine-tune changes, and a group that mixed them would carry its matrices'
  bytes into every such fine-tune (measured on a 34 MB model with small matrices: a
  norms-and-biases fine-tune added 25 % of the base before, 0.06 % after; a 7B-shaped
  model keeps its 930 objects, its vectors already sit between large tensors). Bytes
  between tensors (padding) go with the preceding chunk.
* **CDC** — every other file is cut by FastCDC (content-defined: an insert shifts only
  nearby cuts); files up to ``small_file_bytes`` are one chunk.

Defaults are measured, not guessed: 16 MiB pieces keep per-object overhead (one request,
one file, one index row) under 1% of transfer time at loopback speeds while giving a
loader tensor-granular readiness; 4 MiB CDC averages match the group size.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyfastcdc
import xxhash

from manifests.safetensors import SafetensorsHeader

MiB = 1024 * 1024

TENSOR_PIECE_BYTES = 16 * MiB
GROUP_MAX_BYTES = 4 * MiB
# Tensors below this are grouped with neighbours; at or above it each is its own chunk,
# so changing one mid-sized tensor never drags its neighbours' bytes along.
SMALL_TENSOR_BYTES = 1 * MiB
# One name in GROUP_NAME_MODULUS ends a group: about 8 small tensors a group on average.
GROUP_NAME_MODULUS = 8
CDC_AVG_BYTES = 4 * MiB
CDC_MIN_BYTES = 1 * MiB
CDC_MAX_BYTES = 16 * MiB
SMALL_FILE_BYTES = 1 * MiB

Span = tuple[int, int]  # (offset, length)


@dataclass(frozen=True)
class ChunkingOptions:
    """Chunk size settings; validated so a bad value fails at construction."""

    tensor_piece_bytes: int = TENSOR_PIECE_BYTES
    group_max_bytes: int = GROUP_MAX_BYTES
    small_tensor_bytes: int = SMALL_TENSOR_BYTES
    group_name_modulus: int = GROUP_NAME_MODULUS
    cdc_avg_bytes: int = CDC_AVG_BYTES
    cdc_min_bytes: int = CDC_MIN_BYTES
    cdc_max_bytes: int = CDC_MAX_BYTES
    small_file_bytes: int = SMALL_FILE_BYTES

    def __post_init__(self) -> None:
        for name in ("tensor_piece_bytes", "group_max_bytes", "small_tensor_bytes",
                     "cdc_avg_bytes",
                     "cdc_min_bytes", "cdc_max_bytes", "group_name_modulus"):
            if getattr(self, name) < 1:
                raise ValueError(f"ChunkingOptions.{name} must be ≥ 1")
        if not (self.cdc_min_bytes <= self.cdc_avg_bytes <= self.cdc_max_bytes):
            raise ValueError("ChunkingOptions: need cdc_min_bytes ≤ cdc_avg_bytes ≤ "
                             "cdc_max_bytes")
        if self.cdc_min_bytes < 64 or self.cdc_max_bytes > 1 << 30:
            raise ValueError("ChunkingOptions: CDC sizes must lie in [64 B, 1 GiB]")
        if self.small_file_bytes < 0:
            raise ValueError("ChunkingOptions.small_file_bytes must be ≥ 0")


DEFAULT_OPTIONS = ChunkingOptions()


def _ends_group(name: str, modulus: int) -> bool:
    return xxhash.xxh3_64_intdigest(name.encode("utf-8")) % modulus == 0


def plan_safetensors(header: SafetensorsHeader,
                     options: ChunkingOptions = DEFAULT_OPTIONS) -> list[Span]:
    """Spans for a safetensors file whose header has been validated."""
    size = header.file_size
    cuts: list[int] = [0, header.data_start]  # chunk start offsets
    group_start: int | None = None  # start of the open group of small tensors
    group_vectors = False  # whether the open group holds vectors (norms, biases)

    def close_group(at: int) -> None:
        nonlocal group_start
        if group_start is not None:
            group_start = None
            cuts.append(at)

    for t in header.tensors:
        if t.nbytes == 0:
            continue
        if t.nbytes >= min(options.small_tensor_bytes, options.group_max_bytes):
            close_group(t.begin)
            cuts.append(t.begin)
            pos = t.begin + options.tensor_piece_bytes
            while pos < t.end:
                cuts.append(pos)
                pos += options.tensor_piece_bytes
            cuts.append(t.end)
            continue
        vector = len(t.shape) <= 1
        if group_start is not None and (t.end - group_start > options.group_max_bytes
                                        or vector != group_vectors):
            close_group(t.begin)
        if group_start is None:
            group_start = t.begin
            group_vectors = vector
            cuts.append(t.begin)
        if _ends_group(t.name, options.group_name_modulus):
            close_group(t.end)
    # Padding after a tensor belongs to the chunk before it: drop cuts that would make a
    # chunk of pure padding by moving each cut to the next tensor start at or after it.
    return _spans_from_cuts(cuts, size, header)


def _spans_from_cuts(cuts: list[int], size: int, header: SafetensorsHeader) -> list[Span]:
    starts = {header.data_start} | {t.begin for t in header.tensors if t.nbytes}
    ends = {t.end for t in header.tensors if t.nbytes}
    points = sorted({c for c in cuts if 0 <= c < size})
    kept: list[int] = []
    for c in points:
        # A cut at a tensor's end that is not also a tensor's start is padding: the
        # padding joins the previous chunk, so the cut moves to the next start.
        if c in ends and c not in starts and c != 0:
            continue
        kept.append(c)
    # ``kept`` is sorted, unique and starts at 0, so each span is non-empty.
    return [(start, (kept[i + 1] if i + 1 < len(kept) else size) - start)
            for i, start in enumerate(kept)]


def plan_cdc(data: bytes | bytearray | memoryview,
             options: ChunkingOptions = DEFAULT_OPTIONS) -> list[Span]:
    """Content-defined spans for an opaque buffer."""
    n = len(data)
    if n == 0:
        return []
    if n <= options.small_file_bytes or n <= options.cdc_min_bytes:
        return [(0, n)]
    cdc = pyfastcdc.FastCDC(avg_size=options.cdc_avg_bytes, min_size=options.cdc_min_bytes,
                            max_size=options.cdc_max_bytes)
    return [(c.offset, c.length) for c in cdc.cut_buf(data)]


def check_tiling(spans: list[Span], size: int) -> None:
    """Raise ``ValueError`` unless ``spans`` tile ``[0, size)`` in order."""
    pos = 0
    for off, length in spans:
        if off != pos or length <= 0:
            raise ValueError(f"span ({off}, {length}) does not continue at {pos}")
        pos += length
    if pos != size:
        raise ValueError(f"spans cover {pos} bytes of {size}")
