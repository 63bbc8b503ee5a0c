"""The agent's event stream: one frozen record per kind of event, defined once.

A pull's events are what ``GET /v1/pulls/{id}/events`` streams as newline-delimited
JSON, what ``bdn pull --events`` prints, and what the serving runtime
(``serving/readiness.py``) reads to start ``load()`` before the files are complete. The
engine emits these records; readers parse the wire form back with :func:`from_json`.

Per file, in this order (``mount`` is null for a pre-warm pull)::

    {"event": "plan", "bytes": N, "files": [{"path", "mount", "size", "digest"}],
     "bytes_cached", "bytes_resumed", "bytes_local", "bytes_network", "bytes_duplicate"}
    {"event": "file_start", "path", "mount", "size", "partial_path", "disk_path"}
    {"event": "chunk", "path", "mount", "offset", "length", "size", "tier",
     "disk_path"}                         # bytes verified on disk in disk_path
    {"event": "file", "path", "mount", "digest", "size"}   # published in the mount
    {"event": "done", "bytes_by_tier": {...}, "seconds": S}
      | {"event": "error", "message": ..., "error": "<exception class>"}

A pull restored after an agent restart replays ``{"event": "file", "path", "mount",
"restored": true}`` for each file and ``{"event": "done", "restored": true}`` (or an
``error`` with only a message). ``bdn pull --events`` ends with ``{"event": "summary",
...}``: the pull's final status.

The wire form is the contract, so the records are shaped by it: a record's fields are
its keys in wire order, and ``to_json`` writes exactly the keys today's readers see — a
field with a default is left out while it holds the default, except the few the wire
always carries even when null (``mount``, a chunk's ``disk_path``). Readers are lenient
the other way: a key the record does not know is ignored and a kind it does not know
parses to ``None`` (a newer agent may add both), while a known key of the wrong type is
an :class:`~agent.errors.EventError` naming the kind and the field.

This module imports nothing of the agent but its errors, so the serving runtime may
import it (DESIGN.md's layer table: serving → "agent events").
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from agent.errors import EventError

# The key that names an event's kind on the wire.
KIND_KEY = "event"

Check = Callable[[str, str, Any], Any]


def _fail(kind: str, name: str, message: str) -> EventError:
    return EventError(message, kind=kind, field=name)


def _str(kind: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(kind, name, f"must be a string, got {value!r}")
    return value


def _count(kind: str, name: str, value: Any) -> int:
    # bool is an int in Python and never a count on the wire.
    if type(value) is not int or value < 0:
        raise _fail(kind, name, f"must be a non-negative integer, got {value!r}")
    return value


def _seconds(kind: str, name: str, value: Any) -> float:
    if type(value) not in (int, float) or value < 0:
        raise _fail(kind, name, f"must be a non-negative number, got {value!r}")
    return value  # type: ignore[no-any-return]


def _flag(kind: str, name: str, value: Any) -> bool:
    if type(value) is not bool:
        raise _fail(kind, name, f"must be true or false, got {value!r}")
    return value


def _tier_bytes(kind: str, name: str, value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise _fail(kind, name, f"must be an object of tier → bytes, got {value!r}")
    return {_str(kind, f"{name}.<key>", k): _count(kind, f"{name}.{k}", v)
            for k, v in value.items()}


def _nullable(check: Check) -> Check:
    def nullable(kind: str, name: str, value: Any) -> Any:
        return None if value is None else check(kind, name, value)
    return nullable


def _wire(check: Check, *, default: Any = dataclasses.MISSING,
          always: bool = False) -> Any:
    """A field of a record: how its wire value is checked, and whether the wire carries
    it even when it holds its default (``always``) or leaves it out then."""
    meta = {"check": check, "always": always}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def _to_json(record: Any, kind: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {} if kind is None else {KIND_KEY: kind}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if (f.default is not dataclasses.MISSING and not f.metadata["always"]
                and value == f.default):
            continue
        doc[f.name] = _wire_value(value)
    return doc


def _wire_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_wire_value(v) for v in value]
    if isinstance(value, dict):
        return dict(value)
    if dataclasses.is_dataclass(value):
        return _to_json(value, None)
    return value


def _from_json(cls: type[Any], doc: Any, kind: str, where: str = "") -> Any:
    if not isinstance(doc, Mapping):
        raise _fail(kind, where or KIND_KEY, f"must be a JSON object, got {doc!r}")
    args = {}
    for f in dataclasses.fields(cls):
        name = f"{where}.{f.name}" if where else f.name
        if f.name not in doc:
            if f.default is dataclasses.MISSING:
                raise _fail(kind, name, "is missing")
            continue
        args[f.name] = f.metadata["check"](kind, name, doc[f.name])
    return cls(**args)


class Event:
    """What every event record has: its kind, and its wire form both ways."""

    KIND: ClassVar[str]
    # The last event of a pull: a follower stops after it.
    FINAL: ClassVar[bool] = False

    def to_json(self) -> dict[str, Any]:
        """The wire form: a JSON object, keys in wire order, ``"event"`` first."""
        return _to_json(self, self.KIND)

    def to_line(self) -> bytes:
        """One line of the NDJSON stream (compact separators), newline included."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Any:
        """This kind's record from its wire form; :class:`EventError` names a bad field."""
        return _from_json(cls, doc, cls.KIND)


@dataclass(frozen=True, kw_only=True)
class PlannedFile:
    """One file of a :class:`Plan`: where it goes and what it is."""

    path: str = _wire(_str)
    mount: str | None = _wire(_nullable(_str), default=None, always=True)
    size: int | None = _wire(_nullable(_count), default=None)
    digest: str | None = _wire(_nullable(_str), default=None)


def _planned_files(kind: str, name: str, value: Any) -> tuple[PlannedFile, ...]:
    if not isinstance(value, list):
        raise _fail(kind, name, f"must be a list of files, got {value!r}")
    return tuple(_from_json(PlannedFile, f, kind, f"{name}[{i}]")
                 for i, f in enumerate(value))


@dataclass(frozen=True, kw_only=True)
class Plan(Event):
    """Every file the pull will deliver, and where its bytes are expected to come from.

    Sent first, so a loader can list a folder before any file in it is complete.
    """

    KIND: ClassVar[str] = "plan"

    bytes: int | None = _wire(_nullable(_count), default=None)
    files: tuple[PlannedFile, ...] = _wire(_planned_files)
    bytes_cached: int | None = _wire(_nullable(_count), default=None)
    bytes_resumed: int | None = _wire(_nullable(_count), default=None)
    bytes_local: int | None = _wire(_nullable(_count), default=None)
    bytes_network: int | None = _wire(_nullable(_count), default=None)
    bytes_duplicate: int | None = _wire(_nullable(_count), default=None)


@dataclass(frozen=True, kw_only=True)
class FileStarted(Event):
    """A file's partial file exists in the node cache; its verified ranges follow."""

    KIND: ClassVar[str] = "file_start"

    path: str = _wire(_str)
    mount: str | None = _wire(_nullable(_str), default=None, always=True)
    size: int = _wire(_count)
    partial_path: str = _wire(_str)
    disk_path: str = _wire(_str)


@dataclass(frozen=True, kw_only=True)
class ChunkVerified(Event):
    """Bytes ``[offset, offset + length)`` of a file are verified on disk in
    ``disk_path`` (the partial file until publication, the same inode after)."""

    KIND: ClassVar[str] = "chunk"

    path: str = _wire(_str)
    mount: str | None = _wire(_nullable(_str), default=None, always=True)
    offset: int = _wire(_count)
    length: int = _wire(_count)
    size: int | None = _wire(_nullable(_count), default=None)
    tier: str | None = _wire(_nullable(_str), default=None)
    disk_path: str | None = _wire(_nullable(_str), default=None, always=True)


@dataclass(frozen=True, kw_only=True)
class FilePublished(Event):
    """A file is complete and at ``mount/path`` (``restored``: replayed after a restart,
    without digest and size)."""

    KIND: ClassVar[str] = "file"

    path: str = _wire(_str)
    mount: str | None = _wire(_nullable(_str), default=None, always=True)
    digest: str | None = _wire(_nullable(_str), default=None)
    size: int | None = _wire(_nullable(_count), default=None)
    restored: bool = _wire(_flag, default=False)


@dataclass(frozen=True, kw_only=True)
class Done(Event):
    """The pull finished: every file is in place."""

    KIND: ClassVar[str] = "done"
    FINAL: ClassVar[bool] = True

    bytes_by_tier: Mapping[str, int] | None = _wire(_nullable(_tier_bytes), default=None)
    seconds: float | None = _wire(_nullable(_seconds), default=None)
    restored: bool = _wire(_flag, default=False)


@dataclass(frozen=True, kw_only=True)
class Error(Event):
    """The pull failed or was released; ``error`` names the exception class if known."""

    KIND: ClassVar[str] = "error"
    FINAL: ClassVar[bool] = True

    message: str = _wire(_str)
    error: str | None = _wire(_nullable(_str), default=None)


@dataclass(frozen=True, kw_only=True)
class Summary(Event):
    """The last line of ``bdn pull --events``: the pull's final status, flattened in."""

    KIND: ClassVar[str] = "summary"

    status: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {KIND_KEY: self.KIND, **self.status}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Summary:
        if not isinstance(doc, Mapping):
            raise _fail(cls.KIND, KIND_KEY, f"must be a JSON object, got {doc!r}")
        return cls(status={k: v for k, v in doc.items() if k != KIND_KEY})


KINDS: dict[str, type[Event]] = {cls.KIND: cls for cls in (
    Plan, FileStarted, ChunkVerified, FilePublished, Done, Error, Summary)}


def from_json(doc: Any) -> Event | None:
    """The record of one wire event, or ``None`` for a kind this code does not know.

    Raises :class:`EventError` (naming the field) for a known kind with a bad field, or
    for something that is not an event at all.
    """
    if not isinstance(doc, Mapping):
        raise EventError(f"must be a JSON object, got {doc!r}", kind="", field="")
    kind = doc.get(KIND_KEY)
    if not isinstance(kind, str):
        raise EventError(f"must name the event's kind as a string, got {kind!r}",
                         kind="", field=KIND_KEY)
    cls = KINDS.get(kind)
    return None if cls is None else cls.from_json(doc)


def from_line(line: bytes | str) -> Event | None:
    """:func:`from_json` of one NDJSON line; a line that is not JSON is an EventError."""
    try:
        doc = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EventError(f"is not JSON: {e}", kind="", field="") from None
    return from_json(doc)
