"""The agent's event records (agent/events.py): the exact wire form of each kind, round
trips both ways, tolerance of what a newer agent may add, and errors that name the field.

The wire lines below are the NDJSON ``GET /v1/pulls/{id}/events`` sends (and what the
agent sent before the records existed): a change to one is a protocol change that every
loader and ``bdn pull --events`` reader sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent import events
from agent.cli import run_standalone
from agent.errors import AgentError, EventError
from agent.options import AgentOptions
from bdn.errors import BdnError
from tests.agent.agent_support import Model

DIGEST = "b3:" + "ab" * 32

# (record, its exact wire line) for every kind and every shape the engine sends.
WIRE: list[tuple[events.Event, bytes]] = [
    (events.Plan(bytes=10, files=(
        events.PlannedFile(path="config.json", mount="/m", size=4, digest=DIGEST),
        events.PlannedFile(path="w.safetensors", mount="/m", size=6, digest=DIGEST)),
        bytes_cached=4, bytes_resumed=0, bytes_local=0, bytes_network=6, bytes_duplicate=0),
     b'{"event":"plan","bytes":10,"files":[{"path":"config.json","mount":"/m","size":4,'
     b'"digest":"' + DIGEST.encode() + b'"},{"path":"w.safetensors","mount":"/m","size":6,'
     b'"digest":"' + DIGEST.encode() + b'"}],"bytes_cached":4,"bytes_resumed":0,'
     b'"bytes_local":0,"bytes_network":6,"bytes_duplicate":0}\n'),
    # A pre-warm pull has no mount: the key is still there, null.
    (events.Plan(bytes=0, files=(events.PlannedFile(path="e", mount=None, size=0,
                                                    digest=DIGEST),),
                 bytes_cached=0, bytes_resumed=0, bytes_local=0, bytes_network=0,
                 bytes_duplicate=0),
     b'{"event":"plan","bytes":0,"files":[{"path":"e","mount":null,"size":0,"digest":"'
     + DIGEST.encode() + b'"}],"bytes_cached":0,"bytes_resumed":0,"bytes_local":0,'
     b'"bytes_network":0,"bytes_duplicate":0}\n'),
    (events.FileStarted(path="w.safetensors", mount="/m", size=6, partial_path="/c/p",
                        disk_path="/c/p"),
     b'{"event":"file_start","path":"w.safetensors","mount":"/m","size":6,'
     b'"partial_path":"/c/p","disk_path":"/c/p"}\n'),
    (events.ChunkVerified(path="w.safetensors", mount=None, offset=0, length=6, size=6,
                          tier="cluster", disk_path="/c/p"),
     b'{"event":"chunk","path":"w.safetensors","mount":null,"offset":0,"length":6,'
     b'"size":6,"tier":"cluster","disk_path":"/c/p"}\n'),
    (events.FilePublished(path="config.json", mount="/m", digest=DIGEST, size=0),
     b'{"event":"file","path":"config.json","mount":"/m","digest":"' + DIGEST.encode()
     + b'","size":0}\n'),
    # Replayed after an agent restart: no digest, no size.
    (events.FilePublished(path="config.json", mount="/m", restored=True),
     b'{"event":"file","path":"config.json","mount":"/m","restored":true}\n'),
    (events.Done(bytes_by_tier={"node": 4, "peer": 0, "cluster": 6, "store": 0},
                 seconds=0.25),
     b'{"event":"done","bytes_by_tier":{"node":4,"peer":0,"cluster":6,"store":0},'
     b'"seconds":0.25}\n'),
    (events.Done(restored=True), b'{"event":"done","restored":true}\n'),
    (events.Error(message="no such ref", error="NotFoundError"),
     b'{"event":"error","message":"no such ref","error":"NotFoundError"}\n'),
    (events.Error(message="the pull was released"),
     b'{"event":"error","message":"the pull was released"}\n'),
    # An exception with no message still sends the key.
    (events.Error(message="", error="PullError"),
     b'{"event":"error","message":"","error":"PullError"}\n'),
    (events.Summary(status={"id": "p1", "state": "done", "error": None}),
     b'{"event":"summary","id":"p1","state":"done","error":null}\n'),
]


@pytest.mark.parametrize(("record", "line"), WIRE,
                         ids=[f"{r.KIND}-{i}" for i, (r, _) in enumerate(WIRE)])
def test_events_wire_form_is_exact(record: events.Event, line: bytes) -> None:
    assert record.to_line() == line
    assert json.dumps(record.to_json(), separators=(",", ":")).encode() + b"\n" == line


@pytest.mark.parametrize(("record", "line"), WIRE,
                         ids=[f"{r.KIND}-{i}" for i, (r, _) in enumerate(WIRE)])
def test_events_round_trip(record: events.Event, line: bytes) -> None:
    assert events.from_json(record.to_json()) == record
    assert events.from_line(line) == record
    assert type(record).from_json(json.loads(line)) == record


def test_events_every_kind_is_covered_once() -> None:
    assert set(events.KINDS) == {r.KIND for r, _ in WIRE}
    assert {k for k, cls in events.KINDS.items() if cls.FINAL} == {"done", "error"}


def test_events_readers_accept_the_short_forms_loaders_were_promised() -> None:
    # What serving/readiness.py has always accepted: sizes, mounts and disk paths
    # optional.
    plan = events.from_json({"event": "plan", "files": [{"path": "m.safetensors",
                                                         "size": 3}]})
    assert plan == events.Plan(files=(events.PlannedFile(path="m.safetensors", size=3),))
    chunk = events.from_json({"event": "chunk", "path": "a", "offset": 0, "length": 8})
    assert chunk == events.ChunkVerified(path="a", offset=0, length=8)
    assert events.from_json({"event": "file", "path": "a"}) == events.FilePublished(path="a")
    assert events.from_json({"event": "done"}) == events.Done()


def test_events_unknown_kinds_and_keys_from_a_newer_agent_are_tolerated() -> None:
    assert events.from_json({"event": "peer_joined", "peer": "x"}) is None
    assert events.from_line(b'{"event":"file_verified_twice","path":"a"}\n') is None
    chunk = events.from_json({"event": "chunk", "path": "a", "offset": 1, "length": 2,
                              "checksum": "later"})
    assert chunk == events.ChunkVerified(path="a", offset=1, length=2)


@pytest.mark.parametrize(("doc", "kind", "field", "says"), [
    ({"event": "chunk", "path": "a", "offset": -1, "length": 2}, "chunk", "offset",
     "non-negative integer"),
    ({"event": "chunk", "path": "a", "offset": True, "length": 2}, "chunk", "offset",
     "non-negative integer"),
    ({"event": "chunk", "path": "a", "length": 2}, "chunk", "offset", "is missing"),
    ({"event": "chunk", "path": 7, "offset": 0, "length": 2}, "chunk", "path", "string"),
    ({"event": "plan", "files": {"a": 1}}, "plan", "files", "list of files"),
    ({"event": "plan", "files": [{"path": "a"}, {"size": 1}]}, "plan", "files[1].path",
     "is missing"),
    ({"event": "plan", "files": ["a"]}, "plan", "files[0]", "JSON object"),
    ({"event": "file", "path": "a", "restored": "yes"}, "file", "restored",
     "true or false"),
    ({"event": "done", "bytes_by_tier": {"store": -5}}, "done", "bytes_by_tier.store",
     "non-negative integer"),
    ({"event": "done", "seconds": "soon"}, "done", "seconds", "non-negative number"),
    ({"event": "error"}, "error", "message", "is missing"),
    ({"event": 3}, "", "event", "kind"),
])
def test_events_malformed_event_names_the_field(doc: dict[str, Any], kind: str, field: str,
                                                says: str) -> None:
    with pytest.raises(EventError) as info:
        events.from_json(doc)
    err = info.value
    assert isinstance(err, AgentError) and isinstance(err, BdnError)
    assert (err.kind, err.field) == (kind, field)
    assert f": {field}: " in str(err) and says in str(err)


@pytest.mark.parametrize("line", [b"[1, 2]\n", b"not json\n", b'"chunk"\n'])
def test_events_a_line_that_is_no_event_is_an_error(line: bytes) -> None:
    with pytest.raises(EventError, match="event: "):
        events.from_line(line)


def test_events_the_engine_emits_what_readers_parse(tmp_path: Path, store: Path,
                                                   base: Model) -> None:
    # A real pull, cold then warm then pre-warm: every dict the engine hands out parses
    # back to a record whose wire form is the same dict, key order included.
    seen: list[dict[str, Any]] = []
    options = AgentOptions(cache_dir=tmp_path / "node", budget_bytes=1 << 30,
                           store_url=str(store))
    for body in ({"ref": base.ref, "mount": str(tmp_path / "m1")},
                 {"ref": base.ref, "mount": str(tmp_path / "m2")},
                 {"ref": base.ref, "prewarm": True}):
        run_standalone(options, body, seen.append)
    kinds = {ev["event"] for ev in seen}
    assert kinds == {"plan", "file_start", "chunk", "file", "done"}
    for ev in seen:
        record = events.from_json(ev)
        assert record is not None
        assert list(record.to_json().items()) == list(ev.items())
