"""Streaming a remote file into chunks (``bdn.transfer.stream``): parts, the in-order source
checksum over chunks that finish in any order, resume, failures — into a real store."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bdn.errors import SourceError
from bdn.retry import RetryableError, RetryPolicy
from bdn.store import BlobStore, Incoming
from bdn.transfer.crc import CRC32, CrcKind, crc32c
from bdn.transfer.files import Checksum, FetchCounters, SourceFile
from bdn.transfer.options import DownloadOptions
from bdn.transfer.stream import Landed, Part, plan_parts, stream_file
from manifests.digest import Digest

FAST = RetryPolicy(attempts=3, base_delay_s=0.0, max_delay_s=0.0)
DATA = bytes((i * 7919 + i // 251) % 256 for i in range(700_000))
# A header-sized first chunk, then chunks of uneven sizes, as a tensor plan gives.
SPANS = [(0, 1000), (1000, 150_000), (151_000, 49_000), (200_000, 300_000),
         (500_000, 1), (500_001, 199_999)]


class _Sink:
    """Feeds the store's own receiving path and records what landed."""

    def __init__(self, store: BlobStore, off: int, length: int,
                 landed: dict[int, Digest]) -> None:
        self.incoming: Incoming = store.incoming(length)
        self.off, self.landed = off, landed

    def write(self, data: memoryview) -> None:
        self.incoming.write(data)

    def finish(self) -> None:
        self.incoming.commit()
        self.landed[self.off] = self.incoming.digest()

    def read_back(self) -> Iterator[bytes | memoryview]:
        return self.incoming.read_back()

    def close(self) -> None:
        self.incoming.close()


def _sha256(expected: str | None = None) -> Checksum:
    return Checksum("sha256", expected or hashlib.sha256(DATA).hexdigest(), hashlib.sha256)


def _crc(kind: CrcKind, expected: str | None = None) -> Checksum:
    return Checksum.of_crc(kind, expected or kind.b64(kind.extend(0, DATA)))


def _stream(tmp_path: Path, fetch, *, prefix: bytes = b"", checksum: Checksum | None = None,
            part_bytes: int = 128 * 1024, concurrency: int = 4
            ) -> tuple[BlobStore, dict[int, Digest], FetchCounters]:
    store = BlobStore(str(tmp_path / "store"))
    landed: dict[int, Digest] = {}
    counters = FetchCounters()
    stream_file(source_uri="t://s", file=SourceFile("w.safetensors", len(DATA)), spans=SPANS,
                prefix=prefix, fetch=fetch,
                open_chunk=lambda off, n: _Sink(store, off, n, landed),
                options=DownloadOptions(part_bytes=part_bytes, concurrency=concurrency,
                                        retry=FAST),
                counters=counters, counter_lock=threading.Lock(),
                checksum=checksum or _sha256())
    return store, landed, counters


def _temp_files(store: BlobStore) -> list[Path]:
    return [p for p in Path(store.url).rglob("*") if ".tmp-" in p.name]


def test_plan_parts_cuts_runs_of_whole_chunks() -> None:
    assert plan_parts(SPANS, 0, 128 * 1024) == [
        Part(0, 151_000, 0, 2), Part(151_000, 500_000, 2, 4), Part(500_000, 700_000, 4, 6)]
    # A probe that fetched 3000 bytes: the first part starts inside chunk 1.
    assert plan_parts(SPANS, 3000, 1)[0] == Part(3000, 151_000, 1, 2)
    assert plan_parts(SPANS, len(DATA), 1) == []


def test_plan_parts_keeps_parts_near_part_bytes_after_a_probe() -> None:
    even = [(0, 100), (100, 100), (200, 100), (300, 100)]
    # The probe fetched 10 bytes: the first run falls 10 short of 200 and stops there
    # rather than taking a third chunk (290 + 100 would leave one long part).
    assert plan_parts(even, 10, 200) == [Part(10, 200, 0, 2), Part(200, 400, 2, 4)]
    assert plan_parts(even, 0, 200) == [Part(0, 200, 0, 2), Part(200, 400, 2, 4)]
    # Under half of part_bytes still takes the next chunk, however large.
    assert plan_parts([(0, 10), (10, 500), (510, 90)], 0, 200) == [
        Part(0, 510, 0, 2), Part(510, 600, 2, 3)]
    # Landed chunks split runs; a chunk past part_bytes is a part alone.
    assert plan_parts(even, 0, 200, landed={1}) == [
        Part(0, 100, 0, 1), Part(200, 400, 2, 4)]
    assert plan_parts([(0, 300), (300, 50)], 0, 200) == [Part(0, 300, 0, 1),
                                                          Part(300, 350, 1, 2)]


def test_crc_of_pieces_combines_to_the_crc_of_the_whole() -> None:
    kinds = [CRC32] + ([crc32c()] if crc32c() else [])  # type: ignore[list-item]
    for kind in kinds:
        whole = kind.extend(0, DATA)
        for cut in (0, 1, 4096, 333_333, len(DATA)):
            a, b = kind.extend(0, DATA[:cut]), kind.extend(0, DATA[cut:])
            assert kind.combine(a, b, len(DATA) - cut) == whole
    assert CRC32.b64(zlib.crc32(b"abc")) == base64.b64encode(
        zlib.crc32(b"abc").to_bytes(4, "big")).decode()


@pytest.mark.parametrize("which", ["sha256", "crc32", "crc32c"])
def test_chunks_finishing_out_of_order_are_stored_and_checksummed_in_order(
        tmp_path: Path, which: str) -> None:
    kind = {"crc32": CRC32, "crc32c": crc32c()}.get(which)
    if which == "crc32c" and kind is None:
        pytest.skip("google-crc32c's C extension is not installed")
    later_done = threading.Event()
    requests: list[tuple[int, int]] = []

    def fetch(start: int, end: int) -> Iterator[bytes]:
        requests.append((start, end))
        if start == 3000:
            # The first part waits until a later one has finished, so every other chunk
            # completes before the frontier and must be hashed from the store later.
            assert later_done.wait(10)
        for pos in range(start, end, 10_000):
            yield DATA[pos:min(pos + 10_000, end)]
        if end == len(DATA):
            later_done.set()

    store, landed, counters = _stream(tmp_path, fetch, prefix=DATA[:3000],
                                      part_bytes=64 * 1024,
                                      checksum=_crc(kind) if kind else _sha256())
    assert sorted(landed) == [off for off, _ in SPANS]
    for off, length in SPANS:
        digest = landed[off]
        assert digest == Digest.of(DATA[off:off + length])
        # Read through the store: this data compresses, so large chunks are kept as zstd.
        assert store.get_object(digest) == DATA[off:off + length]
    assert store.stat_object(landed[200_000]).encoding == "zstd"  # type: ignore[union-attr]
    assert store.stat_object(landed[0]).encoding == "raw"  # type: ignore[union-attr]
    assert counters.bytes_from_origin == len(DATA) - 3000  # the probe's bytes not refetched
    assert min(s for s, _ in requests) == 3000
    assert not _temp_files(store)


def test_dropped_connection_resumes_at_the_first_missing_byte(tmp_path: Path) -> None:
    requests: list[tuple[int, int]] = []
    dropped = threading.Event()

    def fetch(start: int, end: int) -> Iterator[bytes]:
        requests.append((start, end))
        if start == 151_000 and not dropped.is_set():
            dropped.set()
            yield DATA[start:start + 77_777]
            raise RetryableError("connection reset")
        yield DATA[start:end]

    _store, landed, counters = _stream(tmp_path, fetch)
    assert (151_000 + 77_777, 500_000) in requests
    assert counters.bytes_from_origin == len(DATA)  # nothing fetched twice
    assert all(landed[off] == Digest.of(DATA[off:off + n]) for off, n in SPANS)


def test_bytes_that_fail_the_source_checksum_are_refused(tmp_path: Path) -> None:
    def fetch(start: int, end: int) -> Iterator[bytes]:
        yield DATA[start:end]

    with pytest.raises(SourceError) as info:
        _stream(tmp_path / "a", fetch, checksum=_sha256("0" * 64))
    assert "sha256 checksum" in str(info.value) and info.value.file == "w.safetensors"
    assert not _temp_files(BlobStore(str(tmp_path / "a" / "store")))
    with pytest.raises(SourceError, match="crc32 checksum"):
        _stream(tmp_path / "b", fetch, checksum=_crc(CRC32, "AAAAAA=="))
    assert not _temp_files(BlobStore(str(tmp_path / "b" / "store")))


def test_a_failing_part_stops_the_others_and_is_the_error_raised(tmp_path: Path) -> None:
    def fetch(start: int, end: int) -> Iterator[bytes]:
        if start == 500_000:
            raise SourceError("origin gone", source="t://s", file="w.safetensors")
        yield DATA[start:end]

    with pytest.raises(SourceError, match="origin gone"):
        _stream(tmp_path, fetch, part_bytes=64 * 1024, concurrency=2)
    assert not _temp_files(BlobStore(str(tmp_path / "store")))


def test_chunks_a_dead_mirror_was_receiving_are_swept(tmp_path: Path) -> None:
    store = BlobStore(str(tmp_path / "store"))
    abandoned, live = store.incoming(10), store.incoming(10)
    abandoned.write(b"12345")
    live.write(b"67890")
    old = Path(abandoned.tmp)  # type: ignore[attr-defined]
    os.utime(old, (1000.0, 1000.0))
    assert store.sweep_incoming(now=1000.0 + 3600.0) == 1
    assert not old.exists()
    assert Path(live.tmp).exists()  # type: ignore[attr-defined]
    live.close()
    abandoned.close()
    assert not _temp_files(store)


@pytest.mark.parametrize("which", ["sha256", "crc32"])
def test_chunks_landed_by_an_interrupted_attempt_are_not_fetched_again(
        tmp_path: Path, which: str) -> None:
    # The first attempt dies at the part holding chunks 2-3; chunks 0-1 and 4-5 land.
    record: dict[int, int | None] = {}

    def dying(start: int, end: int) -> Iterator[bytes]:
        if start == 151_000:
            raise SourceError("killed", source="t://s", file="w.safetensors")
        yield DATA[start:end]

    checksum = _crc(CRC32) if which == "crc32" else _sha256()
    store = BlobStore(str(tmp_path / "store"))
    landed_first: dict[int, Digest] = {}
    counters = FetchCounters()
    opts = DownloadOptions(part_bytes=128 * 1024, concurrency=1, retry=FAST)
    with pytest.raises(SourceError, match="killed"):
        stream_file(source_uri="t://s", file=SourceFile("w.safetensors", len(DATA)),
                    spans=SPANS, prefix=b"", fetch=dying,
                    open_chunk=lambda off, n: _Sink(store, off, n, landed_first),
                    options=opts, counters=counters, counter_lock=threading.Lock(),
                    checksum=checksum, on_chunk=lambda i, crc: record.__setitem__(i, crc))
    # The dying part's chunks never land; the last part may have run before the failure
    # stopped the pool (a worker takes the next part at once), or not.
    assert {0, 1} <= set(record) and not {2, 3} & set(record)
    tail_landed = 4 in record
    assert (record[0] is not None) == (which == "crc32")
    # The retry is given what landed; it fetches only the rest, and still verifies all.
    requests: list[tuple[int, int]] = []

    def healthy(start: int, end: int) -> Iterator[bytes]:
        requests.append((start, end))
        yield DATA[start:end]

    index = {off: i for i, (off, _) in enumerate(SPANS)}
    landed = {index[off]: Landed(record[index[off]], lambda d=d: [store.get_object(d)])
              for off, d in landed_first.items()}
    landed_now: dict[int, Digest] = {}
    stream_file(source_uri="t://s", file=SourceFile("w.safetensors", len(DATA)),
                spans=SPANS, prefix=b"", fetch=healthy,
                open_chunk=lambda off, n: _Sink(store, off, n, landed_now),
                options=opts, counters=FetchCounters(), counter_lock=threading.Lock(),
                checksum=checksum, landed=landed)
    assert requests == [(151_000, 500_000)] + ([] if tail_landed else [(500_000, 700_000)])
    assert sorted(landed_now) == [151_000, 200_000] + ([] if tail_landed
                                                       else [500_000, 500_001])
    # A wrong byte in what the retry fetches is still caught by the whole-file checksum.
    with pytest.raises(SourceError, match="checksum"):
        stream_file(source_uri="t://s", file=SourceFile("w.safetensors", len(DATA)),
                    spans=SPANS, prefix=b"",
                    fetch=lambda s, e: iter([b"\0" + DATA[s + 1:e]]),
                    open_chunk=lambda off, n: _Sink(store, off, n, {}),
                    options=opts, counters=FetchCounters(), counter_lock=threading.Lock(),
                    checksum=checksum, landed=landed)
