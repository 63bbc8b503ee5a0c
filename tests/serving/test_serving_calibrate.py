"""The ``auto`` strategy's measurement (``serving/calibrate.py``) on real files.

The decision (:func:`choose`) is pure; :func:`calibrate` is exercised on files written
here, with a small sample so that the measured path stays cheap. That the whole load
then uses what was chosen is ``test_auto_measures_and_picks_a_strategy``
(test_serving_loader.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from serving.calibrate import calibrate, choose
from serving.files import OpenedFile, open_file
from serving.readiness import FilesReady

SAMPLE = 64 << 10


@contextlib.contextmanager
def opened(path: Path) -> Iterator[OpenedFile]:
    f = open_file(str(path), FilesReady())
    try:
        yield f
    finally:
        os.close(f.fd)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_choose_takes_the_faster_sample() -> None:
    assert choose(2.0, 1.0, direct=True) == "direct"
    assert choose(2.0, 1.0, direct=False) == "read"
    assert choose(1.0, 2.0, direct=True) == "mmap"
    assert choose(1.0, 1.0, direct=True) == "mmap"  # no tie-break towards copying


@pytest.mark.parametrize(("tensors", "want"), [
    ({"e": torch.empty(0)}, "mmap"),  # nothing to read
    ({"w": torch.zeros(SAMPLE // 4)}, "mmap"),  # under two samples: not worth timing
])
def test_small_or_empty_files_are_mapped_without_measuring(
        tmp_path: Path, tensors: dict[str, torch.Tensor], want: str) -> None:
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    with opened(path) as f:
        cal = calibrate(f, FilesReady(), instant=True, sample_bytes=SAMPLE)
    assert cal.strategy == want and not cal.lazy_map and cal.figures == {}


def test_a_cached_file_is_mapped_lazily(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(SAMPLE)}, str(path))  # 4 samples
    path.read_bytes()  # into the page cache
    with opened(path) as f:
        cal = calibrate(f, FilesReady(), instant=True, sample_bytes=SAMPLE)
    assert cal.strategy == "mmap" and cal.lazy_map and cal.figures == {"resident": 1.0}


def test_a_cold_file_is_timed_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(SAMPLE)}, str(path))
    evict(path)
    with opened(path) as f:
        cal = calibrate(f, FilesReady(), instant=True, sample_bytes=SAMPLE)
    assert cal.strategy in ("mmap", "direct", "read") and not cal.lazy_map
    assert {"resident", "mmap_s", "read_s"} == set(cal.figures)
    assert cal.strategy == choose(cal.figures["mmap_s"], cal.figures["read_s"],
                                  direct=cal.strategy != "read")
