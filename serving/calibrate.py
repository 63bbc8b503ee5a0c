"""The ``auto`` strategy's measurement: which CPU read strategy suits this load.

Nothing on paper predicts whether mapping a file or reading it directly is faster here:
it depends on whether the file is in the page cache, on the disk, on the memory and on
the kernel. So the first large file is asked (``mincore``) and, unless it is entirely
cached, sampled both ways on two equal, adjacent samples (same cache state, same
memory). :func:`calibrate` does that I/O; :func:`choose` is the decision, a pure
function of what was measured, kept apart so the rule can be read (and tested) alone.

The loader calls this once per load, on the first file with data, and uses the answer
for every file of the load (:mod:`serving.loader`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from serving.errors import ReadinessTimeout
from serving.files import OpenedFile
from serving.rawio import (
    HUGE_PAGE_BYTES,
    PAGE_BYTES,
    map_private,
    mappable,
    open_direct,
    owned_buffer,
    populate,
    pread_direct,
    pread_into,
    resident_fraction,
)
from serving.readiness import ReadinessSource

MIB = 1 << 20
# Each method is timed on this much; files smaller than twice it are mapped (copying a
# small file cannot win enough to matter).
CALIBRATION_SAMPLE_BYTES = 16 * MIB


@dataclass(frozen=True)
class Calibration:
    """The chosen strategy; ``lazy_map``: every page is cached, map without populating.

    ``figures`` is what was measured (``resident``, ``mmap_s``, ``read_s``), for the
    load's stats; empty where nothing was.
    """

    strategy: str
    lazy_map: bool = False
    figures: dict[str, float] = field(default_factory=dict)


def choose(t_map_s: float, t_read_s: float, *, direct: bool) -> str:
    """The faster of the two timed samples; ``direct``: the read sample used O_DIRECT.

    (A tie-break towards the mapping, which costs no memory of its own, picked it on
    cold files here although direct reads finished 25% sooner: one sample understates
    what parallel direct reads gain.)
    """
    if t_read_s < t_map_s:
        return "direct" if direct else "read"
    return "mmap"


def calibrate(opened: OpenedFile, readiness: ReadinessSource, *, instant: bool,
              sample_bytes: int = CALIBRATION_SAMPLE_BYTES) -> Calibration:
    """Pick a CPU strategy by measuring ``opened`` (see the module docstring).

    ``readiness`` is waited on for the two samples' bytes (a file still arriving that
    does not have them yet is mapped); ``instant``: every file is complete, so a direct
    read is possible.
    """
    ts = [t for t in opened.header.tensors if t.nbytes]
    if not ts or not mappable(opened):
        return Calibration("read" if ts else "mmap")
    lo, hi = ts[0].begin, max(t.end for t in ts)
    n = sample_bytes
    if hi - lo < 2 * n:
        return Calibration("mmap")
    try:
        readiness.wait_range(opened.path, lo, lo + 2 * n)
    except ReadinessTimeout:
        return Calibration("mmap")
    a = lo - lo % PAGE_BYTES
    t0 = time.perf_counter()
    with map_private(opened) as mm:
        resident = resident_fraction(mm, a, hi - a)
        if resident == 1.0:
            # Every page is cached: mapping copies nothing, so copying cannot win; and
            # nothing needs reading, so tensors map lazily (populating page tables up
            # front measured 0.12 s for 2 GiB; faulting them in on use is cheaper).
            return Calibration("mmap", lazy_map=True, figures={"resident": 1.0})
        populate(mm, a, n)
    t_map = time.perf_counter() - t0
    direct_fd = open_direct(opened) if instant else None
    t0 = time.perf_counter()
    buf = owned_buffer(max(n, HUGE_PAGE_BYTES))[:n]
    if direct_fd is not None:
        try:
            pread_direct(direct_fd, memoryview(buf.numpy()), a + n, n, opened.path)
        finally:
            os.close(direct_fd)
    else:
        pread_into(opened.fd, memoryview(buf.numpy()), a + n, opened.path)
    del buf
    t_read = time.perf_counter() - t0
    return Calibration(choose(t_map, t_read, direct=direct_fd is not None),
                       figures={"resident": resident, "mmap_s": t_map, "read_s": t_read})
