"""Streaming loads: tensors load while their file is still being written.

The writer here is gated by the test (no sleeps): it writes part of a file, and the test
checks that the loader yields exactly the tensors already covered — before the rest of
the file exists — then lets the writer go on. The same holds through the NDJSON event
stream of the node agent, served by a real HTTP server on loopback (TCP and unix).
"""

from __future__ import annotations

import itertools
import os
import queue
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.errors import ReadinessTimeout, WeightsUnavailableError
from serving.loader import iter_tensors, load
from serving.readiness import EventStreamReadiness, ProgressiveReadiness, RangeSet
from tests.serving.serving_helpers import (
    EventHandler,
    TCPEvents,
    UnixEvents,
    digest,
    write_safetensors,
    write_sharded,
)

N_TENSORS = 12
# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def make_entries(n: int = N_TENSORS, size: int = 40_000) -> dict:
    gen = torch.Generator().manual_seed(n)
    return {f"layer{i:02d}": ("F32", (size // 4,),
                              torch.randn(size // 4, generator=gen).numpy().tobytes())
            for i in range(n)}


class GatedWriter:
    """Copies a finished file into place piece by piece, only when told to."""

    def __init__(self, src: Path, dst: Path, ready: ProgressiveReadiness,
                 preallocate: bool = True) -> None:
        self.data = src.read_bytes()
        self.dst = dst
        self.ready = ready
        self.written = 0
        with open(dst, "wb") as f:
            if preallocate:  # as the agent does: full size, then pwrite each chunk
                f.truncate(len(self.data))

    def write_to(self, end: int) -> None:
        with open(self.dst, "r+b") as f:
            f.seek(self.written)
            f.write(self.data[self.written:end])
        self.ready.mark(self.dst, self.written, end, size=len(self.data))
        self.written = end


def test_rangeset_merges_and_covers() -> None:
    r = RangeSet()
    r.add(10, 20)
    r.add(30, 40)
    assert not r.covers(15, 35)
    r.add(20, 30)
    assert r.ranges == [(10, 40)] and r.covers(15, 35) and not r.covers(5, 11)
    assert r.covers(7, 7)  # an empty range is always covered


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=30),
       st.integers(0, 220), st.integers(0, 40))
def test_rangeset_matches_a_set_of_bytes(adds: list, qb: int, qn: int) -> None:
    r = RangeSet()
    model: set[int] = set()
    for b, n in adds:
        r.add(b, b + n)
        model.update(range(b, b + n))
    assert r.covers(qb, qb + qn) == all(i in model for i in range(qb, qb + qn))
    assert r.covered_bytes() == len(model)
    ranges = r.ranges
    assert all(e1 < b2 for (_, e1), (b2, _) in itertools.pairwise(ranges))


@pytest.mark.parametrize("strategy", ["read", "bounce", "mmap"])
def test_tensors_are_yielded_before_the_file_is_complete(tmp_path: Path,
                                                         strategy: str) -> None:
    entries = make_entries()
    src = tmp_path / "src.safetensors"
    offsets = write_safetensors(src, entries)
    dst = tmp_path / "mount" / "model.safetensors"
    dst.parent.mkdir()
    ready = ProgressiveReadiness()
    writer = GatedWriter(src, dst, ready)
    half = offsets["layer05"][1]  # the header and tensors 0..5
    writer.write_to(half)

    got: dict[str, str] = {}
    it = iter_tensors(dst, readiness=ready, strategy=strategy, workers=3,
                      read_chunk_bytes=16 << 10, bounce_buffer_bytes=16 << 10)
    first_half = {n for n, (_, e) in offsets.items() if e <= half}
    while set(got) != first_half:
        name, t = next(it)
        got[name] = digest(t)
        assert name in first_half  # nothing past the written bytes
    assert writer.written < len(writer.data)  # causality: the file is still incomplete

    writer.write_to(len(writer.data))
    ready.finish()
    for name, t in it:
        got[name] = digest(t)
    assert set(got) == set(entries)
    ref = load(src)
    assert all(got[n] == digest(ref[n]) for n in entries)


def test_streaming_sharded_with_plan_before_any_file_exists(tmp_path: Path) -> None:
    entries = make_entries(9)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    write_sharded(src_dir, entries, shards=3)
    mount = tmp_path / "mount"
    mount.mkdir()
    ready = ProgressiveReadiness(root=mount)
    names = sorted(p.name for p in src_dir.iterdir())
    ready.plan({n: (src_dir / n).stat().st_size for n in names})
    result: dict = {}

    def consume() -> None:
        try:
            result["out"] = load(mount, readiness=ready, strategy="read")
        except BaseException as e:
            result["err"] = e

    loader = threading.Thread(target=consume)
    loader.start()  # it must wait: not even the index exists yet
    for n in names:  # the index sorts last; shards arrive first
        (mount / n).write_bytes((src_dir / n).read_bytes())
        ready.mark_complete(n)
    ready.finish()
    loader.join(60)
    assert "err" not in result, result.get("err")
    ref = load(src_dir)
    assert {k: digest(v) for k, v in result["out"].items()} == \
        {k: digest(v) for k, v in ref.items()}


def test_a_failed_pull_fails_the_load_naming_the_range(tmp_path: Path) -> None:
    entries = make_entries(4)
    src = tmp_path / "src.safetensors"
    offsets = write_safetensors(src, entries)
    dst = tmp_path / "model.safetensors"
    ready = ProgressiveReadiness()
    writer = GatedWriter(src, dst, ready)
    writer.write_to(offsets["layer01"][1])
    it = iter_tensors(dst, readiness=ready, strategy="read")
    names = {next(it)[0], next(it)[0]}
    assert names == {"layer00", "layer01"}
    ready.fail("cache peer 10.0.0.7 refused the range")
    with pytest.raises(WeightsUnavailableError, match="refused the range") as info:
        list(it)
    assert info.value.path == str(dst)
    assert info.value.begin is not None and info.value.begin >= offsets["layer01"][1]


def test_a_pull_that_finishes_without_the_bytes_fails(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    offsets = write_safetensors(src, make_entries(3))
    dst = tmp_path / "model.safetensors"
    ready = ProgressiveReadiness()
    GatedWriter(src, dst, ready).write_to(offsets["layer00"][1])
    ready.finish()
    with pytest.raises(WeightsUnavailableError, match="finished without"):
        load(dst, readiness=ready)


def test_wait_timeout(tmp_path: Path) -> None:
    ready = ProgressiveReadiness()
    with pytest.raises(ReadinessTimeout, match="within"):
        load(tmp_path / "never.safetensors", readiness=ready, wait_timeout_s=0.3)


def test_stalls_count_as_waiting_for_weights(tmp_path: Path) -> None:
    src = tmp_path / "src.safetensors"
    offsets = write_safetensors(src, make_entries(2))
    dst = tmp_path / "model.safetensors"
    ready = ProgressiveReadiness()
    writer = GatedWriter(src, dst, ready)
    writer.write_to(offsets["layer00"][1])
    from serving.loader import open_weights

    stream = open_weights(dst, readiness=ready, strategy="read")
    it = iter(stream)
    next(it)  # layer00; the loader now waits for layer01
    writer.write_to(len(writer.data))
    ready.finish()
    assert [n for n, _ in it] == ["layer01"]
    assert stream.stats.waiting_s > 0
    assert stream.stats.loading_s >= 0


# -- the agent's NDJSON event stream over real sockets ------------------------------------

@pytest.fixture(params=["tcp", "unix"])
def event_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple]:
    if request.param == "tcp":
        srv: socketserver.BaseServer = TCPEvents(("127.0.0.1", 0), EventHandler)
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1/pulls/p1/events"
    else:
        sock = str(tmp_path / "agent.sock")
        srv = UnixEvents(sock, EventHandler)
        url = f"http+unix://{quote(sock, safe='')}/v1/pulls/p1/events"
    srv.events = queue.Queue()  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield url, srv.events  # type: ignore[attr-defined]
    srv.events.put(None)  # type: ignore[attr-defined]
    srv.shutdown()
    srv.server_close()


def test_event_stream_drives_a_streaming_load(tmp_path: Path, event_server: tuple) -> None:
    url, events = event_server
    entries = make_entries(6)
    src = tmp_path / "src.safetensors"
    offsets = write_safetensors(src, entries)
    mount = tmp_path / "mount"
    mount.mkdir()
    # The agent writes into a partial file elsewhere and renames it when verified.
    partial = tmp_path / "partial.bin"
    data = src.read_bytes()
    partial.write_bytes(b"\0" * len(data))
    ready = EventStreamReadiness(url, mount)
    events.put({"event": "plan", "files": [{"path": "model.safetensors", "size": len(data)}]})
    it = iter_tensors(mount, readiness=ready, strategy="read")
    cut = offsets["layer02"][1]
    with open(partial, "r+b") as f:
        f.write(data[:cut])
    events.put({"event": "chunk", "path": "model.safetensors", "offset": 0, "length": cut,
                "disk_path": str(partial)})
    seen = {next(it)[0] for _ in range(3)}
    assert seen == {"layer00", "layer01", "layer02"}
    with open(partial, "r+b") as f:
        f.seek(cut)
        f.write(data[cut:])
    os.link(partial, mount / "model.safetensors")
    events.put({"event": "file", "path": "model.safetensors", "digest": "b3:00"})
    events.put({"event": "done"})
    rest = dict(it)
    assert set(rest) | seen == set(entries)
    ref = load(src)
    assert all(digest(rest[n]) == digest(ref[n]) for n in rest)
    ready.close()


def test_event_stream_error_event_fails_the_load(tmp_path: Path, event_server: tuple) -> None:
    url, events = event_server
    ready = EventStreamReadiness(url, tmp_path)
    events.put({"event": "error", "message": "manifest b3:12 not found in the store"})
    with pytest.raises(WeightsUnavailableError, match="not found in the store"):
        load(tmp_path / "model.safetensors", readiness=ready)
    ready.close()


def test_event_stream_escaping_path_is_refused(tmp_path: Path, event_server: tuple) -> None:
    url, events = event_server
    ready = EventStreamReadiness(url, tmp_path / "mount")
    events.put({"event": "chunk", "path": "../../etc/passwd", "offset": 0, "length": 8})
    with pytest.raises(WeightsUnavailableError, match="escapes the mount root"):
        load(tmp_path / "mount" / "model.safetensors", readiness=ready)
    ready.close()


def test_event_stream_skips_kinds_it_does_not_know(tmp_path: Path,
                                                   event_server: tuple) -> None:
    # A newer agent may add kinds; this reader acts on the ones it knows.
    url, events = event_server
    src = tmp_path / "src.safetensors"
    write_safetensors(src, make_entries(2))
    mount = tmp_path / "mount"
    mount.mkdir()
    os.link(src, mount / "model.safetensors")
    ready = EventStreamReadiness(url, mount)
    events.put({"event": "peer_joined", "peer": "http://10.0.0.9:7400"})
    events.put({"event": "file_start", "path": "model.safetensors", "mount": str(mount),
                "size": src.stat().st_size, "partial_path": str(src),
                "disk_path": str(src)})
    events.put({"event": "file", "path": "model.safetensors", "later_field": 1})
    events.put({"event": "done"})
    assert set(load(mount / "model.safetensors", readiness=ready)) == {"layer00", "layer01"}
    ready.close()


def test_event_stream_malformed_event_names_the_field(tmp_path: Path,
                                                      event_server: tuple) -> None:
    url, events = event_server
    ready = EventStreamReadiness(url, tmp_path)
    events.put({"event": "chunk", "path": "model.safetensors", "offset": "0", "length": 8})
    with pytest.raises(WeightsUnavailableError, match="chunk event: offset: must be"):
        load(tmp_path / "model.safetensors", readiness=ready)
    ready.close()


def test_event_stream_that_ends_early_fails(tmp_path: Path, event_server: tuple) -> None:
    url, events = event_server
    ready = EventStreamReadiness(url, tmp_path)
    events.put(None)  # the server closes the stream without "done"
    with pytest.raises(WeightsUnavailableError, match="ended before the pull was done"):
        load(tmp_path / "model.safetensors", readiness=ready)
    ready.close()


def test_event_stream_http_error_is_reported(tmp_path: Path, event_server: tuple) -> None:
    url, _ = event_server
    ready = EventStreamReadiness(url.replace("/events", "/nothing"), tmp_path)
    with pytest.raises(WeightsUnavailableError, match="answered 404"):
        load(tmp_path / "model.safetensors", readiness=ready)
    ready.close()
