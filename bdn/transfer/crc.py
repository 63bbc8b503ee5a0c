"""CRC32 and CRC32C in the form S3 and GCS report them, computable per chunk and combined.

Object stores publish a whole-object CRC (base64 of the big-endian value). A CRC can be
computed over pieces independently and the pieces' CRCs combined afterwards, knowing only
their lengths (zlib's ``crc32_combine``: multiply by the matrix of "append N zero bits"
over GF(2)). That is what lets a streamed mirror verify each chunk on the thread that
receives it, while its bytes are still in the CPU cache, in any order, instead of
replaying every chunk in file order (see :mod:`bdn.transfer.stream`). Digests that cannot
be combined (MD5, SHA-256) still take the in-order path.
"""

from __future__ import annotations

import base64
import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class CrcKind:
    """A reflected 32-bit CRC: its polynomial and a fast ``extend(crc, data) -> crc``."""

    name: str
    poly: int
    extend: Callable[[int, bytes | memoryview], int]

    def combine(self, crc1: int, crc2: int, len2: int) -> int:
        """The CRC of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)``."""
        # Apply "append 2**k zero bytes" for each bit k set in len2; the operators are
        # built once per polynomial (building them per call cost ~2 ms, with the GIL).
        ops = _zero_byte_ops(self.poly)
        k = 0
        while len2 > 0:
            if len2 & 1:
                crc1 = _times(ops[k], crc1)
            len2 >>= 1
            k += 1
        return crc1 ^ crc2

    @staticmethod
    def b64(crc: int) -> str:
        return base64.b64encode(crc.to_bytes(4, "big")).decode()


@functools.cache
def _zero_byte_ops(poly: int) -> tuple[list[int], ...]:
    """For each k < 64, the GF(2) operator "append 2**k zero bytes" of a reflected CRC
    with polynomial ``poly`` (zlib's ``crc32_combine``): "append one zero bit", squared
    three times for a byte, then once more for each doubling."""
    op = [poly] + [1 << n for n in range(31)]
    for _ in range(3):
        op = _square(op)
    ops = [op]
    for _ in range(63):
        ops.append(_square(ops[-1]))
    return tuple(ops)


def _times(mat: list[int], vec: int) -> int:
    out = 0
    i = 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _square(mat: list[int]) -> list[int]:
    return [_times(mat, mat[n]) for n in range(32)]


CRC32 = CrcKind("crc32", 0xEDB88320, lambda crc, data: zlib.crc32(data, crc))


def _readonly(data: bytes | memoryview) -> bytes:
    # google_crc32c takes only read-only bytes; a view of a whole bytes object is free.
    if isinstance(data, bytes):
        return data
    if isinstance(data.obj, bytes) and data.nbytes == len(data.obj):
        return data.obj
    return bytes(data)


@functools.cache
def crc32c() -> CrcKind | None:
    """CRC32C, hardware-accelerated, or None where no fast implementation is installed
    (a pure-Python CRC is far slower than MD5: not worth using).

    ``crc32c`` (ICRAR) first: it takes any buffer and releases the GIL on large ones, so
    the threads checking chunks run beside the event loop that reads the network.
    ``google_crc32c`` holds the GIL and takes only read-only bytes (a copy of every
    block received into a bytearray)."""
    try:
        import crc32c as icrar
    except ImportError:
        icrar = None
    if icrar is not None and getattr(icrar, "hardware_based", False):
        fast = icrar.crc32c
        return CrcKind("crc32c", 0x82F63B78, lambda crc, data: int(fast(data, crc)))
    try:
        import google_crc32c
    except ImportError:
        return None
    if google_crc32c.implementation != "c":
        return None
    extend = google_crc32c.extend
    return CrcKind("crc32c", 0x82F63B78, lambda crc, data: int(extend(crc, _readonly(data))))


class CrcHasher:
    """A :class:`CrcKind` as a hasher whose ``hexdigest`` is the base64 form stores use."""

    def __init__(self, kind: CrcKind) -> None:
        self.kind = kind
        self.crc = 0

    def update(self, data: bytes | memoryview) -> None:
        self.crc = self.kind.extend(self.crc, data)

    def hexdigest(self) -> str:
        return self.kind.b64(self.crc)
