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
from manifests.safetensors import parse_header
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
     "overflows"),
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


@pytest.mark.parametrize("entries, data_len, tensor, offset, needle", [
    ({"a": {"dtype": "U8", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, 0, "a", 0,
     "overflows"),
    ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
      "b": {"dtype": "U8", "shape": [4], "data_offsets": [6, 10]}}, 10, "b", 6,
     "leaves a gap"),
    ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, 6, "a", 2,
     "does not start at offset 0"),
    ({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, 7, None, 4,
     "3 trailing bytes after the last tensor ('a')"),
])
def test_loader_is_as_strict_as_the_reference(entries: dict, data_len: int,
                                              tensor: str | None, offset: int,
                                              needle: str) -> None:
    path = _header_file(entries, data_len)
    raw = json.dumps(entries).encode()
    data_start = 8 + len(raw)
    for strategy in STRATEGIES:
        with pytest.raises(SafetensorsError) as info:
            load(path, strategy=strategy)
        err = info.value
        assert err.tensor == tensor and err.path == path and needle in str(err)
        assert err.offset == data_start + offset
        assert f"byte offset {err.offset}" in str(err) and path in str(err)
    os.unlink(path)


def test_file_shorter_than_its_tensors_after_header(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"a": ("F32", (1024,), bytes(4096))})
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    for strategy in STRATEGIES:
        with pytest.raises(SafetensorsError, match=r"tensor 'a'.*past the end") as info:
            load(path, strategy=strategy)
        assert info.value.offset is not None


# -- the same verdict as the reference parser ---------------------------------------------


def _reference_accepts(data: bytes) -> bool:
    """Whether the ``safetensors`` package opens ``data``: it validates the whole header
    (offsets, coverage, sizes) when it opens a file."""
    from safetensors import safe_open

    path = _write_raw(data)
    try:
        with safe_open(path, "np") as f:
            f.keys()
        return True
    except Exception:  # the reference raises SafetensorError, or a JSON/IO error
        return False
    finally:
        os.unlink(path)


def _bdn_accepts(data: bytes) -> bool:
    try:
        parse_header(data, len(data), path="x.safetensors")
        return True
    except SafetensorsError:
        return False


def _file(header: bytes | dict[str, object], data_len: int) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"x" * data_len


def _t(begin: int, end: int, shape: list[int] | None = None, dtype: str = "U8"
       ) -> dict[str, object]:
    return {"dtype": dtype, "shape": [end - begin] if shape is None else shape,
            "data_offsets": [begin, end]}


T4 = b'{"dtype":"U8","shape":[4],"data_offsets":[0,4]}'
T48 = b'{"dtype":"U8","shape":[4],"data_offsets":[4,8]}'
CORPUS: dict[str, bytes] = {
    "valid": _file({"a": _t(0, 4), "b": _t(4, 12, [2], "F32")}, 12),
    "empty": _file({}, 0),
    "metadata only": _file({"__metadata__": {"k": "v"}}, 0),
    "metadata null": _file({"__metadata__": None, "a": _t(0, 4)}, 4),
    "metadata not strings": _file({"__metadata__": {"k": 1}}, 0),
    "metadata twice": _file(b'{"__metadata__":{"a":"b"},"__metadata__":{"a":"c"}}', 0),
    "metadata key twice": _file(b'{"__metadata__":{"a":"b","a":"c"}}', 0),
    "gap": _file({"a": _t(0, 4), "b": _t(6, 8)}, 8),
    "not from 0": _file({"a": _t(2, 6)}, 6),
    "trailing bytes": _file({"a": _t(0, 4)}, 6),
    "trailing bytes, no tensors": _file({}, 2),
    "overlap": _file({"a": _t(0, 4), "b": _t(2, 6)}, 6),
    "past the end": _file({"a": _t(0, 8)}, 4),
    "shape overflows": _file({"a": _t(0, 4, [2**32, 2**32, 2**32])}, 4),
    "shape overflows before a 0": _file({"a": _t(0, 0, [2**40, 2**40, 0])}, 0),
    "bits overflow": _file({"a": _t(0, 8, [2**62, 2], "F32")}, 8),
    "zero-size tensors": _file({"z": _t(0, 0, [0]), "a": _t(0, 4), "y": _t(4, 4, [0, 3])},
                               4),
    "zero-size tensor inside another": _file({"a": _t(0, 4), "z": _t(2, 2, [0])}, 4),
    "zero-size tensor past the end": _file({"a": _t(0, 4), "z": _t(6, 6, [0])}, 4),
    "duplicate name, last valid": _file(b'{"a":' + T48 + b',"a":' + T4 + b"}", 4),
    "duplicate name, last leaves a gap": _file(b'{"a":' + T4 + b',"a":' + T48 + b"}", 8),
    "duplicate name, same entry": _file(b'{"a":' + T4 + b',"a":' + T4 + b"}", 4),
    "duplicate field in an entry": _file(
        b'{"a":{"dtype":"U8","dtype":"U8","shape":[4],"data_offsets":[0,4]}}', 4),
    "unknown field": _file({"a": {**_t(0, 4), "extra": [1]}}, 4),
    "unknown dtype": _file({"a": _t(0, 4, dtype="X9")}, 4),
    "size mismatch": _file({"a": _t(0, 4, [3])}, 4),
    "F4 half byte": _file({"a": _t(0, 1, [1], "F4")}, 1),
    "F4 whole byte": _file({"a": _t(0, 1, [2], "F4")}, 1),
    "negative dim": _file({"a": _t(0, 4, [-4])}, 4),
    "float dim": _file({"a": {"dtype": "U8", "shape": [4.0], "data_offsets": [0, 4]}}, 4),
    "bool dim": _file({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1),
    "three offsets": _file({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4, 4]}},
                           4),
    "top-level list": _file(b"[]", 0),
    "entry not an object": _file({"a": 1}, 0),
    "NUL padding": struct.pack("<Q", 8) + b"{}" + b"\0" * 6,
    "leading space": _file(b" " + json.dumps({"a": _t(0, 4)}).encode(), 4),
    "lone surrogate name": _file(b'{"\\ud800":' + T4 + b"}", 4),
    "header length past the end": struct.pack("<Q", 64) + b"{}",
    "header length 0": struct.pack("<Q", 0),
    "too short": b"\x01\x00",
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_same_verdict_as_the_reference_parser(case: str) -> None:
    data = CORPUS[case]
    assert _bdn_accepts(data) == _reference_accepts(data), case


ref_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["U8", "F16", "F32", "F4", "BOOL"]),
    "shape": st.lists(st.integers(min_value=0, max_value=6), max_size=3),
    "data_offsets": st.lists(st.integers(min_value=0, max_value=40), min_size=2,
                             max_size=2)})


@SETTINGS
@given(entries=st.dictionaries(st.sampled_from("abcd"), ref_entry, max_size=4),
       data_len=st.integers(min_value=0, max_value=48))
def test_random_small_headers_same_verdict_as_the_reference(entries: dict,
                                                            data_len: int) -> None:
    data = _file(entries, data_len)
    assert _bdn_accepts(data) == _reference_accepts(data)
