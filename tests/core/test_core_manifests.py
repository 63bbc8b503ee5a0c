"""The pure core: digests, chunk plans, manifest validation, safetensors headers."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifests.chunking import ChunkingOptions, check_tiling, plan_cdc, plan_safetensors
from manifests.digest import Digest
from manifests.errors import DigestError, IntegrityError, ManifestError, SafetensorsError
from manifests.manifest import (
    EMPTY_FILE_DIGEST,
    Chunk,
    FileEntry,
    build_manifest,
    file_digest,
    manifest_from_dict,
    parse_manifest,
)
from manifests.refs import Ref
from manifests.safetensors import parse_header

MiB = 1024 * 1024


def test_digest_roundtrip_and_strict_parse() -> None:
    d = Digest.of(b"abc")
    assert Digest.parse(str(d)) == d
    assert str(d).startswith("b3:") and len(d.hex) == 64
    for bad in ("b3:xyz", "sha256:" + "0" * 64, "b3:" + "A" * 64, "b3:" + "0" * 63, 7):
        with pytest.raises(DigestError):
            Digest.parse(bad)
    with pytest.raises(IntegrityError):
        d.verify(b"abd")


def st_file(tensors: list[tuple[str, str, list[int]]], *, pad: int = 0) -> bytes:
    """Build safetensors bytes by hand (so tests can also make malformed ones)."""
    sizes = {"F16": 2, "F32": 4, "U8": 1, "BF16": 2}
    header, body, off = {}, b"", 0
    for name, dtype, shape in tensors:
        n = sizes[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        body += bytes((off + i) % 251 for i in range(n)) + b"\0" * pad
        off += n + pad
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def test_safetensors_plan_cuts_at_tensors_and_splits_large_ones() -> None:
    opts = ChunkingOptions(tensor_piece_bytes=1000, group_max_bytes=400, cdc_min_bytes=64,
                           cdc_avg_bytes=256, cdc_max_bytes=1024, small_file_bytes=64)
    data = st_file([("a", "U8", [2500]), ("b", "U8", [10]), ("c", "U8", [20]),
                    ("d", "U8", [900])])
    h = parse_header(data, len(data))
    spans = plan_safetensors(h, opts)
    check_tiling(spans, len(data))
    starts = [s for s, _ in spans]
    t = h.by_name
    assert spans[0] == (0, h.data_start)  # the header is one chunk
    # the large tensor is cut every 1000 bytes from its own first byte
    a = t["a"].begin
    assert {a, a + 1000, a + 2000} <= set(starts)
    assert t["d"].begin in starts


def test_safetensors_padding_goes_with_a_neighbour() -> None:
    opts = ChunkingOptions(tensor_piece_bytes=1000, group_max_bytes=100, cdc_min_bytes=64,
                           cdc_avg_bytes=256, cdc_max_bytes=1024, small_file_bytes=64)
    data = st_file([("a", "U8", [300]), ("b", "U8", [300])], pad=8)
    h = parse_header(data, len(data), strict=False)  # the planner tolerates gaps
    spans = plan_safetensors(h, opts)
    check_tiling(spans, len(data))
    assert all(length >= 300 for off, length in spans[1:])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 16)), min_size=0, max_size=30))
def test_safetensors_plan_always_tiles(sizes: list[tuple[int, int]]) -> None:
    opts = ChunkingOptions(tensor_piece_bytes=1024, group_max_bytes=512, cdc_min_bytes=64,
                           cdc_avg_bytes=256, cdc_max_bytes=1024, small_file_bytes=64)
    data = st_file([(f"t{i}", "U8", [n]) for i, (n, _) in enumerate(sizes)])
    h = parse_header(data, len(data))
    check_tiling(plan_safetensors(h, opts), len(data))


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=0, max_size=20000))
def test_cdc_plan_always_tiles(data: bytes) -> None:
    opts = ChunkingOptions(cdc_min_bytes=256, cdc_avg_bytes=1024, cdc_max_bytes=4096,
                           small_file_bytes=512, tensor_piece_bytes=4096, group_max_bytes=1024)
    check_tiling(plan_cdc(data, opts), len(data))


def test_cdc_insert_shifts_only_nearby_cuts() -> None:
    import random

    rnd = random.Random(5)
    base = bytes(rnd.getrandbits(8) for _ in range(3 * MiB))
    opts = ChunkingOptions(cdc_min_bytes=16 * 1024, cdc_avg_bytes=64 * 1024,
                           cdc_max_bytes=256 * 1024, small_file_bytes=1024)
    a = {base[o:o + n] for o, n in plan_cdc(base, opts)}
    edited = base[:MiB] + b"inserted!" + base[MiB:]
    b = [edited[o:o + n] for o, n in plan_cdc(edited, opts)]
    new = sum(len(c) for c in b if c not in a)
    assert new < 0.2 * len(edited)


@pytest.mark.parametrize("blob,needle", [
    (struct.pack("<Q", 2**60) + b"{}", "exceeds the limit"),
    (struct.pack("<Q", 50) + b"{}", "runs past the end"),
    (struct.pack("<Q", 3) + b"{x}", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "not an object"),
    (b"\x01\x00", "too short"),
])
def test_broken_headers_are_rejected_with_offsets(blob: bytes, needle: str) -> None:
    with pytest.raises(SafetensorsError) as e:
        parse_header(blob, len(blob), path="m.safetensors")
    assert needle in str(e.value) and "m.safetensors" in str(e.value)
    assert e.value.offset is not None


def _hdr(entries: dict) -> bytes:
    h = json.dumps(entries).encode()
    return struct.pack("<Q", len(h)) + h


def test_header_offsets_out_of_range_overlapping_and_mismatched() -> None:
    out_of_range = _hdr({"a": {"dtype": "U8", "shape": [10], "data_offsets": [0, 10]}}) + b"x" * 5
    with pytest.raises(SafetensorsError, match="past the end"):
        parse_header(out_of_range, len(out_of_range))
    overlap = _hdr({"a": {"dtype": "U8", "shape": [10], "data_offsets": [0, 10]},
                    "b": {"dtype": "U8", "shape": [10], "data_offsets": [5, 15]}}) + b"x" * 15
    with pytest.raises(SafetensorsError, match="overlaps") as e:
        parse_header(overlap, len(overlap))
    assert e.value.tensor == "b"
    mismatch = _hdr({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 10]}}) + b"x" * 10
    with pytest.raises(SafetensorsError, match="does not match shape"):
        parse_header(mismatch, len(mismatch))
    # A name given twice keeps its last entry, as in the reference parser: here ``1``.
    dup = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": 1}'
    blob = struct.pack("<Q", len(dup)) + dup + b"x"
    with pytest.raises(SafetensorsError, match="tensor 'a': entry is not a JSON object"):
        parse_header(blob, len(blob))
    dup = b'{"__metadata__": {}, "__metadata__": {}}'
    blob = struct.pack("<Q", len(dup)) + dup
    with pytest.raises(SafetensorsError, match="duplicate key '__metadata__'"):
        parse_header(blob, len(blob))


def _entry(path: str, data: bytes) -> FileEntry:
    chunks = (Chunk(Digest.of(data), 0, len(data)),) if data else ()
    return FileEntry.from_chunks(path, chunks)


def test_manifest_canonical_and_digest_stable() -> None:
    m = build_manifest([_entry("b.txt", b"bb"), _entry("a/x.bin", b"a" * 10),
                        _entry("e", b"")], {"uri": "file:///x"})
    assert [f.path for f in m.files] == ["a/x.bin", "b.txt", "e"]
    raw = m.canonical_bytes()
    assert b" " not in raw.replace(b"file:///x", b"")
    again = parse_manifest(raw, expect=m.digest)
    assert again == m and again.digest == m.digest
    assert m.files[2].digest == EMPTY_FILE_DIGEST


def _doc(files: list[dict]) -> dict:
    return {"version": 1, "source": {"uri": "x"}, "files": files}


def _fd(path: str = "a", size: int = 4, chunks: list[dict] | None = None) -> dict:
    d = Digest.of(b"abcd")
    if chunks is None:
        chunks = [{"digest": str(d), "offset": 0, "length": size, "encoding": "raw",
                   "stored_length": size}]
    root = file_digest(Chunk(Digest.parse(c["digest"]), c["offset"], c["length"])
                       for c in chunks)
    return {"path": path, "size": size, "mode": 0o644, "digest": str(root), "chunks": chunks}


@pytest.mark.parametrize("files,record,field", [
    ([_fd("../x")], "files[0]", "path"),
    ([_fd("/etc/passwd")], "files[0]", "path"),
    ([_fd("a/./b")], "files[0]", "path"),
    ([_fd("a"), _fd("a")], "files[1]", "path"),
    ([_fd("a"), _fd("a/b")], "files", "path"),
])
def test_manifest_rejects_bad_paths(files: list[dict], record: str, field: str) -> None:
    with pytest.raises(ManifestError) as e:
        manifest_from_dict(_doc(files))
    assert e.value.record == record and e.value.field == field
    assert record in str(e.value)


def test_manifest_rejects_gaps_overlaps_and_bad_sizes() -> None:
    d = str(Digest.of(b"ab"))
    gap = _fd(size=4, chunks=[
        {"digest": d, "offset": 0, "length": 2, "encoding": "raw", "stored_length": 2},
        {"digest": d, "offset": 3, "length": 1, "encoding": "raw", "stored_length": 1}])
    with pytest.raises(ManifestError, match="gap") as e:
        manifest_from_dict(_doc([gap]))
    assert e.value.record == "files[0].chunks[1]" and e.value.field == "offset"
    overlap = _fd(size=4, chunks=[
        {"digest": d, "offset": 0, "length": 3, "encoding": "raw", "stored_length": 3},
        {"digest": d, "offset": 2, "length": 2, "encoding": "raw", "stored_length": 2}])
    with pytest.raises(ManifestError, match="overlap"):
        manifest_from_dict(_doc([overlap]))
    with pytest.raises(ManifestError, match="cover 4 bytes but size is 5"):
        manifest_from_dict(_doc([_fd(size=5, chunks=_fd()["chunks"])]))
    with pytest.raises(ManifestError, match="unknown version"):
        manifest_from_dict({**_doc([_fd()]), "version": 99})
    bad_enc = _fd()
    bad_enc["chunks"][0]["encoding"] = "lz4"
    with pytest.raises(ManifestError, match="unknown encoding"):
        manifest_from_dict(_doc([bad_enc]))


def test_file_digest_must_match_its_chunk_list() -> None:
    ok = _fd()
    manifest_from_dict(_doc([ok]))
    liar = {**ok, "digest": str(Digest.of(b"abcd"))}  # the flat hash is not the file digest
    with pytest.raises(ManifestError, match="does not match its chunk list") as e:
        manifest_from_dict(_doc([liar]))
    assert (e.value.record, e.value.field) == ("files[0]", "digest")


def test_manifest_digest_mismatch_is_detected() -> None:
    m = build_manifest([_entry("a", b"x")], {})
    with pytest.raises(IntegrityError):
        parse_manifest(m.canonical_bytes(), expect=Digest.of(b"other"))


def test_refs() -> None:
    r = Ref.parse("ns/model:v1")
    assert (r.namespace, r.model, r.tag, r.key) == ("ns", "model", "v1", "ns/model/v1")
    assert Ref.parse("ns/model").tag == "latest"
    for bad in ("nomodel", "ns/../x:t", "ns/m:../../x", "ns/m:", "/m:t"):
        with pytest.raises(ValueError):
            Ref.parse(bad)
