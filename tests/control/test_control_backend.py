"""The declarative backend protocol, on the local-process backend with real processes.

The controller only says how many replicas a deployment should have (and which drained
ones to retire); these tests drive the backend the same way and watch what it reports,
waiting on its status events, never on time.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest

from control.backends import (
    FAILED,
    READY,
    STARTING,
    STOPPED,
    LocalBackendOptions,
    LocalProcessBackend,
    ReplicaBackend,
    ReplicaSpec,
    ReplicaStatus,
)
from tests.support.control import STANDIN

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

WAIT_S = 60.0


class Watcher:
    """Collects a backend's status events; waits for a condition on them."""

    def __init__(self, backend: ReplicaBackend) -> None:
        self.events: list[ReplicaStatus] = []
        self._changed = asyncio.Event()
        backend.subscribe(self.on_change)

    def on_change(self, status: ReplicaStatus) -> None:
        self.events.append(status)
        self._changed.set()

    async def until(self, cond: Callable[[], bool]) -> None:
        async def wait() -> None:
            while not cond():
                self._changed.clear()
                await self._changed.wait()
        await asyncio.wait_for(wait(), WAIT_S)

    def states(self, rid: str) -> list[str]:
        return [e.state for e in self.events if e.id == rid]


def ready_ids(backend: LocalProcessBackend, dep: str) -> set[str]:
    return {s.id for s in backend.observe(dep) if s.state == READY}


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_local_backend_converges_retires_and_removes(make_model: Any) -> None:
    backend = LocalProcessBackend(LocalBackendOptions(
        command=(sys.executable, str(STANDIN)), start_retry_backoff_s=0.01))
    watcher = Watcher(backend)
    model = make_model("decl")
    spec = ReplicaSpec(model_id="m", deployment_id="d1", deployment_name="n",
                       model_dir=str(model.path))
    try:
        await backend.apply(spec, 2)
        await backend.apply(spec, 2)  # idempotent: still two
        await watcher.until(lambda: len(ready_ids(backend, "d1")) == 2)
        assert len(backend.observe("d1")) == 2
        first, second = sorted(ready_ids(backend, "d1"))
        assert watcher.states(first) == [STARTING, READY]
        ready = next(s for s in backend.observe("d1") if s.id == first)
        assert ready.url.startswith("http://127.0.0.1:") and ready.cold_start is not None
        assert ready.cold_start.phases["total"] > 0

        # Down to one, retiring the replica the controller drained: that one goes.
        pid = ready.pid
        await backend.apply(spec, 1, retire=(first,))
        await watcher.until(lambda: STOPPED in watcher.states(first))
        assert ready_ids(backend, "d1") == {second} and not alive(pid)

        # A new revision does not count towards n: one of it starts, the old one stays
        # until it is retired.
        v2 = ReplicaSpec(model_id="m", deployment_id="d1", deployment_name="n",
                         model_dir=str(model.path), revision=2)
        await backend.apply(v2, 1)
        await watcher.until(lambda: len(ready_ids(backend, "d1")) == 2)
        assert {s.revision for s in backend.observe("d1")} == {1, 2}
        await backend.apply(v2, 1, retire=(second,))
        await watcher.until(lambda: STOPPED in watcher.states(second))
        assert [s.revision for s in backend.observe("d1")] == [2]

        await backend.remove("d1")
        assert backend.observe("d1") == []
        assert all(not alive(e.pid) for e in watcher.events if e.state == STOPPED)
    finally:
        await backend.close()


async def test_local_backend_retries_failed_starts_with_backoff(make_model: Any) -> None:
    backend = LocalProcessBackend(LocalBackendOptions(
        command=(sys.executable, str(STANDIN)), start_retry_backoff_s=0.01))
    watcher = Watcher(backend)
    broken = make_model("broken", fail_load=True)
    spec = ReplicaSpec(model_id="m", deployment_id="d2", deployment_name="n",
                       model_dir=str(broken.path))
    try:
        await backend.apply(spec, 1)
        await watcher.until(lambda: sum(e.state == FAILED for e in watcher.events) >= 2)
        failed = [e for e in watcher.events if e.state == FAILED]
        assert "load failed on purpose" in (failed[0].error or "")
        # Told to have none, it stops trying.
        await backend.apply(spec, 0)
        await watcher.until(lambda: not backend.observe("d2"))
    finally:
        await backend.close()
    assert all(not alive(e.pid) for e in watcher.events)
