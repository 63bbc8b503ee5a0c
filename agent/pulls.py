"""Pull records: requests, the :class:`Pull` the API sees, idempotency, persistence.

A :class:`Pull` is the unit the API sees: its request, state, counters by tier, and an
append-only list of :mod:`agent.events` records that subscribers replay from the start
(so a loader connecting late misses nothing). :class:`PullBook` keeps every pull of
this agent and persists their records in the node cache's LMDB, so a restarted agent
resumes unfinished pulls by itself, and a client re-posting with the same
``Idempotency-Key`` gets the same pull.

The persisted records are also the mounts' reference counts (``Pull.mounts``: every
live pull holds a reference on each path it names), which is why
:meth:`PullBook.mount_users` reads records this agent did not load as well.

Nothing here runs a pull: the engine (``agent/engine.py``) drives them.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from agent import mounts as mountlib
from agent.errors import IdempotencyConflict, RequestError
from agent.events import Event
from agent.resolve import entry_target
from bdn.config import parse_weights
from bdn.errors import BdnError, ConfigError
from cache.node import NodeCache
from manifests.digest import Digest
from manifests.refs import Ref

TIERS = ("node", "peer", "cluster", "store")
TERMINAL_STATES = ("done", "failed", "released")
# States in which a pull holds its mounts (a reference on every path it names).
LIVE_STATES = ("queued", "running", "done")
PULL_KEY_PREFIX = "pull/"
IDEM_KEY_PREFIX = "idem/"
MAX_IDEMPOTENCY_KEY_CHARS = 255


# -- requests ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetSpec:
    """One thing to pull: a ref or manifest digest, optional patterns, optional mount."""

    name: str
    mount: str | None
    allow: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()


@dataclass(frozen=True)
class PullRequest:
    targets: tuple[TargetSpec, ...]
    order: str = "loader"

    def canonical(self) -> dict[str, Any]:
        return {"order": self.order, "targets": [
            {"name": t.name, "mount": t.mount, "allow": list(t.allow),
             "ignore": list(t.ignore)} for t in self.targets]}

    @classmethod
    def from_canonical(cls, doc: dict[str, Any]) -> PullRequest:
        return cls(tuple(TargetSpec(t["name"], t["mount"], tuple(t["allow"]),
                                    tuple(t["ignore"])) for t in doc["targets"]),
                   order=doc.get("order", "loader"))


def parse_request(doc: Any) -> PullRequest:
    """Validate a ``POST /v1/pulls`` body (see the daemon's docstring for its shape)."""
    if not isinstance(doc, dict):
        raise RequestError("the request body must be a JSON object")
    known = {"ref", "mount", "weights", "mount_root", "prewarm", "order"}
    unknown = set(doc) - known
    if unknown:
        raise RequestError(f"unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    prewarm = bool(doc.get("prewarm", False))
    order = doc.get("order", "loader")
    if order not in ("loader", "path"):
        raise RequestError(f"order must be 'loader' or 'path', got {order!r}")
    has_ref, has_weights = doc.get("ref") is not None, doc.get("weights") is not None
    if has_ref == has_weights:
        raise RequestError("give exactly one of 'ref' (a ref or manifest digest) or "
                           "'weights' (entries as in config.yaml)")
    if has_ref:
        name = doc["ref"]
        if not isinstance(name, str):
            raise RequestError("ref must be a string: namespace/model[:tag] or b3:<hex>")
        try:
            name = str(Digest.parse(name)) if name.startswith("b3:") else str(Ref.parse(name))
        except BdnError as e:
            raise RequestError(str(e)) from None
        mount = doc.get("mount")
        if mount is not None:
            mount = str(mountlib.check_mount_path(mount, field="mount"))
        return PullRequest((TargetSpec(name, None if prewarm else mount),), order=order)
    items = doc["weights"]
    if not isinstance(items, list) or not items:
        raise RequestError("weights must be a non-empty list of entries")
    explicit: list[str | None] = []
    stripped = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError(f"weights[{i}] must be a mapping")
        item = dict(item)
        ref = item.pop("ref", None)
        if ref is not None and not isinstance(ref, str):
            raise RequestError(f"weights[{i}].ref must be a string")
        explicit.append(ref)
        stripped.append(item)
    try:
        entries = parse_weights(stripped)
    except ConfigError as e:
        raise RequestError(str(e)) from None
    root = doc.get("mount_root")
    if root is not None:
        root = str(mountlib.check_mount_path(root, field="mount_root"))
    targets = []
    for i, (entry, ref) in enumerate(zip(entries, explicit, strict=True)):
        try:
            name = entry_target(entry, ref)
        except BdnError as e:
            raise RequestError(str(e)) from None
        mount = None if prewarm else (
            os.path.join(root, entry.mount_location.lstrip("/")) if root
            else entry.mount_location)
        if mount is not None:
            mount = str(mountlib.check_mount_path(
                mount, field=f"weights[{i}].mount_location"))
        targets.append(TargetSpec(name, mount, entry.allow_patterns, entry.ignore_patterns))
    return PullRequest(tuple(targets), order=order)


# -- a pull -----------------------------------------------------------------------------

@dataclass
class Pull:
    id: str
    request: PullRequest
    key: str | None = None
    state: str = "queued"
    error: str | None = None
    events: list[Event] = field(default_factory=list)
    bytes_by_tier: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    bytes_total: int = 0
    bytes_done: int = 0
    files_total: int = 0
    files_done: int = 0
    started: float = 0.0
    finished: float | None = None
    manifests: list[str] = field(default_factory=list)
    mounts: dict[str, list[str]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # file digests pinned by this pull
    owner_uid: int | None = None  # who created it (unix socket peer), when known
    task: asyncio.Task[None] | None = None
    closed: bool = False  # the agent is shutting down: followers stop
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def emit(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self) -> AsyncIterator[Event]:
        """Every event from the first, then live ones, until ``done`` or ``error``."""
        i = 0
        while True:
            waiter = self._changed
            while i < len(self.events):
                ev = self.events[i]
                i += 1
                yield ev
                if ev.FINAL:
                    return
            if (self.state in TERMINAL_STATES or self.closed) and i >= len(self.events):
                return
            await waiter.wait()

    def status(self) -> dict[str, Any]:
        end = self.finished or time.monotonic()
        elapsed = max(1e-9, end - self.started) if self.started else 0.0
        moved = sum(self.bytes_by_tier.values())
        rate = moved / elapsed if elapsed else 0.0
        left = max(0, self.bytes_total - self.bytes_done)
        return {"id": self.id, "state": self.state, "error": self.error,
                "files_total": self.files_total, "files_done": self.files_done,
                "bytes_total": self.bytes_total, "bytes_done": self.bytes_done,
                "bytes_by_tier": dict(self.bytes_by_tier),
                "elapsed_s": round(elapsed, 3), "throughput_bps": round(rate),
                "eta_s": (round(left / rate, 3) if rate and self.state == "running"
                          else (0.0 if self.state == "done" else None)),
                "manifests": list(self.manifests), "mounts": sorted(self.mounts),
                "idempotency_key": self.key}

    @property
    def ended(self) -> bool:
        """Its stream has its last event (``done`` or ``error``)."""
        return bool(self.events) and self.events[-1].FINAL

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "key": self.key, "request": self.request.canonical(),
                "state": self.state, "error": self.error, "mounts": self.mounts,
                "files": self.files, "owner_uid": self.owner_uid}



class PullBook:
    """This agent's pulls by id, their persisted records and idempotency keys.

    Not locked: the engine serialises submissions (one asyncio lock) and everything
    else runs on the event loop.
    """

    def __init__(self, node: NodeCache) -> None:
        self.node = node
        self.pulls: dict[str, Pull] = {}

    def persist(self, pull: Pull) -> None:
        self.node.meta_put(PULL_KEY_PREFIX + pull.id, pull.record())

    def load(self) -> list[Pull]:
        """Every persisted pull, registered here in its last recorded state."""
        loaded = []
        for _, rec in self.node.meta_items(PULL_KEY_PREFIX):
            pull = Pull(id=rec["id"], request=PullRequest.from_canonical(rec["request"]),
                        key=rec.get("key"), state=rec["state"], error=rec.get("error"),
                        mounts=rec.get("mounts", {}), files=rec.get("files", []),
                        owner_uid=rec.get("owner_uid"))
            self.pulls[pull.id] = pull
            loaded.append(pull)
        return loaded

    def by_key(self, key: str, request: PullRequest) -> Pull | None:
        """The pull started with ``key``, if any; :class:`IdempotencyConflict` if that
        pull was for a different request."""
        known = self.node.meta_get(IDEM_KEY_PREFIX + key)
        if known is None or known["id"] not in self.pulls:
            return None
        pull = self.pulls[known["id"]]
        if known["request"] != request.canonical():
            raise IdempotencyConflict(
                f"Idempotency-Key {key!r} was used for a different request "
                f"(pull {pull.id})")
        return pull

    def create(self, request: PullRequest, key: str | None,
               owner_uid: int | None) -> Pull:
        """A new queued pull, registered, its key remembered and its record persisted."""
        pull = Pull(id=uuid.uuid4().hex[:16], request=request, key=key,
                    owner_uid=owner_uid)
        self.pulls[pull.id] = pull
        if key is not None:
            self.node.meta_put(IDEM_KEY_PREFIX + key,
                               {"id": pull.id, "request": request.canonical()})
        self.persist(pull)
        return pull

    def forget_key(self, pull: Pull) -> None:
        """A released pull's key may start a new pull."""
        if pull.key:
            self.node.meta_delete(IDEM_KEY_PREFIX + pull.key)

    def mount_users(self, mount: str, exclude: str) -> list[list[str]]:
        """The paths each other live pull names in ``mount``, from this agent's pulls and
        from records it did not load (a standalone ``bdn pull`` on the same node cache)."""
        users = [p.mounts[mount] for p in self.pulls.values()
                 if p.id != exclude and p.state in LIVE_STATES and mount in p.mounts]
        for _, rec in self.node.meta_items(PULL_KEY_PREFIX):
            if (rec["id"] != exclude and rec["id"] not in self.pulls
                    and rec.get("state") in LIVE_STATES and mount in rec.get("mounts", {})):
                users.append(list(rec["mounts"][mount]))
        return users

    def states(self) -> dict[str, int]:
        """How many pulls are in each state."""
        states: dict[str, int] = {}
        for p in self.pulls.values():
            states[p.state] = states.get(p.state, 0) + 1
        return states


def check_idempotency_key(key: str | None) -> None:
    if key is not None and (not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS):
        raise RequestError(f"Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_CHARS} chars")
