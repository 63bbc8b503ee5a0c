"""The loader's system calls: positioned reads, ``O_DIRECT``, mappings, page residency.

Each function wraps one kernel interface the way the read strategies
(:mod:`serving.strategies`) and the calibration (:mod:`serving.calibrate`) both need
it, with the fallbacks an older kernel or another filesystem requires (no
``MADV_POPULATE_*``, no ``O_DIRECT`` on tmpfs, no ``mincore``). Kept apart so that
calibration measures exactly the reads a strategy then does, and so that neither
imports the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading

import torch

from manifests.errors import SafetensorsError
from serving.files import OpenedFile
from serving.plan import DIRECT_ALIGN_BYTES

MIB = 1 << 20
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+
HUGE_PAGE_BYTES = 2 * MIB
PAGE_BYTES = mmap.PAGESIZE
# Residency (is a file in the page cache?) is sampled: this many windows of this size.
RESIDENCY_SAMPLES = 16
RESIDENCY_WINDOW_BYTES = 256 << 10


def open_direct(opened: OpenedFile) -> int | None:
    """The same file opened again with O_DIRECT, or None where that is not possible."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(f"/proc/self/fd/{opened.fd}", os.O_RDONLY | os.O_CLOEXEC | flag)
    except OSError:  # tmpfs and some filesystems refuse O_DIRECT
        return None


def pread_direct(fd: int, mv: memoryview, offset: int, need: int, path: str) -> None:
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


def pread_into(fd: int, mv: memoryview, offset: int, path: str) -> None:
    """Fill ``mv`` from ``offset``; a file that ends first is an error naming the offset."""
    got = 0
    n = len(mv)
    while got < n:
        k = os.preadv(fd, [mv[got:]], offset + got)
        if k == 0:
            raise SafetensorsError(f"file ends early: needed bytes up to {offset + n}",
                                   path=path, offset=offset + got)
        got += k


def mappable(opened: OpenedFile) -> bool:
    """A mapping is safe only if the bytes it exposes already exist in the file."""
    try:
        return os.fstat(opened.fd).st_size >= opened.size
    except OSError:
        return False


def map_private(opened: OpenedFile) -> mmap.mmap:
    """A private (copy-on-write) mapping of the whole file: tensors may be written to."""
    return mmap.mmap(opened.fd, opened.size, flags=mmap.MAP_PRIVATE,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)


def populate(mm: mmap.mmap, offset: int, length: int) -> None:
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


def resident_fraction(mm: mmap.mmap, offset: int, length: int) -> float:
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


def owned_buffer(nbytes: int) -> torch.Tensor:
    """Fresh uint8 memory advised to use huge pages.

    First touch of fresh 4 KiB pages is what limits a copy into new memory (see
    :mod:`serving.loader`); huge pages take a fault per 2 MiB instead.
    """
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


def prefault(buf: torch.Tensor, step: int, stop: threading.Event) -> None:
    """Fault fresh memory in, ``step`` bytes at a time, until done or ``stop`` is set.

    The kernel zeroes fresh memory on first touch; done inside the readers' ``preadv``
    it stalls their I/O, so a helper runs this ahead of them.
    """
    base, n = buf.data_ptr(), buf.numel()
    if base % PAGE_BYTES:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for off in range(0, n, step):
            if stop.is_set() or libc.madvise(
                    ctypes.c_void_p(base + off), ctypes.c_size_t(min(step, n - off)),
                    MADV_POPULATE_WRITE) != 0:
                return  # cancelled, or a kernel without POPULATE_WRITE: readers fault
    except (OSError, AttributeError):
        return
