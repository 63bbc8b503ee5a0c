"""Hostile safetensors files: a clear error naming file, tensor and offset; bounded memory.

Property tests throw random header bytes, absurd lengths, overlapping and out-of-range
offsets, dtype/shape mismatches and truncations at every loader strategy. Each load
must either succeed (when the mutation happened to stay valid) or raise
:class:`SafetensorsError` — never another exception, never a crash — and never allocate
much more than the file's size.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manifests.errors import BdnError, SafetensorsError
from serving.loader import load
from tests.serving.serving_helpers import write_safetensors

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
STRATEGIES = ("mmap", "read", "direct", "bounce")
# Python-side allocations allowed beyond the file size: parser objects, error text.
SLACK_BYTES = 4 << 20


def _write_raw(data: bytes) -> str:
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _load_bounded(path: str, strategy: str) -> BaseException | None:
    """Load under tracemalloc; assert bounded allocation; return the error, if any."""
    size = os.path.getsize(path)
    tracemalloc.start()
    try:
        load(path, strategy=strategy, bounce_buffer_bytes=8192, read_chunk_bytes=8192,
             workers=2)
        err = None
    except SafetensorsError as e:
        err = e
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        os.unlink(path)
    assert peak <= 2 * size + SLACK_BYTES, f"peak {peak} for a {size}-byte file"
    return err


def _valid_file() -> bytes:
    d = tempfile.mkdtemp()
    p = Path(d) / "v.safetensors"
    write_safetensors(p, {"a": ("F32", (4,), bytes(16)), "b": ("I64", (2, 2), bytes(32)),
                          "c": ("U8", (), b"\x05")})
    data = p.read_bytes()
    p.unlink()
    os.rmdir(d)
    return data


VALID = _valid_file()


@SETTINGS
@given(data=st.binary(max_size=512), strategy=st.sampled_from(STRATEGIES))
def test_random_bytes_give_a_clear_error(data: bytes, strategy: str) -> None:
    err = _load_bounded(_write_raw(data), strategy)
    assert err is not None  # random bytes are never a valid file
    assert ".safetensors" in str(err)


@SETTINGS
@given(n=st.integers(min_value=0, max_value=2**64 - 1), tail=st.binary(max_size=256),
       strategy=st.sampled_from(STRATEGIES))
def test_any_header_length_is_bounded(n: int, tail: bytes, strategy: str) -> None:
    err = _load_bounded(_write_raw(struct.pack("<Q", n) + tail), strategy)
    assert err is not None and err.offset is not None


def test_header_length_2_to_60_reads_nothing_large() -> None:
    path = _write_raw(struct.pack("<Q", 2**60) + b"{}")
    err = _load_bounded(path, "read")
    assert isinstance(err, SafetensorsError)
    assert err.offset == 0 and "exceeds" in str(err)


@SETTINGS
@given(pos=st.integers(min_value=0, max_value=len(VALID) - 1),
       byte=st.integers(min_value=0, max_value=255), strategy=st.sampled_from(STRATEGIES))
def test_single_byte_mutations_never_crash(pos: int, byte: int, strategy: str) -> None:
    data = bytearray(VALID)
    data[pos] = byte
    _load_bounded(_write_raw(bytes(data)), strategy)  # succeeds or SafetensorsError


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=len(VALID) - 1),
       strategy=st.sampled_from(STRATEGIES))
def test_truncated_files_give_a_clear_error(cut: int, strategy: str) -> None:
    err = _load_bounded(_write_raw(VALID[:cut]), strategy)
    assert err is not None and err.offset is not None


def _header_file(entries: dict[str, object], data_len: int) -> str:
    raw = json.dumps(entries).encode()
    return _write_raw(struct.pack("<Q", len(raw)) + raw + bytes(data_len))


offsets = st.integers(min_value=-2, max_value=2**63)
dtypes = st.sampled_from(["F32", "F16", "I8", "BOOL", "F4", "F6_E2M3", "C64", "X9", ""])
entry = st.fixed_dictionaries({
    "dtype": dtypes,
    "shape": st.lists(st.integers(min_value=-1, max_value=2**40), max_size=4),
    "data_offsets": st.lists(offsets, min_size=2, max_size=2)})


@SETTINGS
@given(entries=st.dictionaries(st.text(min_size=1, max_size=8), entry, min_size=1,
                               max_size=5),
       data_len=st.integers(min_value=0, max_value=4096),
       strategy=st.sampled_from(STRATEGIES))
def test_hostile_entries_fail_before_any_large_allocation(entries: dict, data_len: int,
                                                          strategy: str) -> None:
    err = _load_bounded(_header_file(entries, data_len), strategy)
    if err is not None and err.tensor is not None:
        assert err.tensor in entries


@pytest.mark.parametrize("entries, data_len, tensor, needle", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "b", "overlaps"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "a", "past the end"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "a", "does not match"),
    ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 1]}}, 1, "a", "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}, 8, "a",
     "does not match"),
])
def test_specific_hostile_headers_name_file_tensor_and_offset(
        entries: dict, data_len: int, tensor: str, needle: str) -> None:
    path = _header_file(entries, data_len)
    with pytest.raises(SafetensorsError) as info:
        load(path)
    os.unlink(path)
    assert info.value.tensor == tensor
    assert info.value.path == path and path in str(info.value)
    assert needle in str(info.value)
    assert isinstance(info.value, BdnError)


def test_file_shorter_than_its_tensors_after_header(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"a": ("F32", (1024,), bytes(4096))})
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    for strategy in STRATEGIES:
        with pytest.raises(SafetensorsError, match=r"tensor 'a'.*past the end") as info:
            load(path, strategy=strategy)
        assert info.value.offset is not None
