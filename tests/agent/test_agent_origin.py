"""The store is read once per byte however many agents pull at once, even when a slow
pod makes the agents hedge (issue 17: origin ÷ model = 1.00 for every N).

Real processes on loopback: the blob store served over HTTP by
``tests/cache/store_http.py`` (which counts the object bytes it sends: the origin
bytes, counted outside bdn), three cache pods reading it, one of them behind a proxy
that holds every object answer past the agents' first-byte deadline (alive and filling,
but slow to answer — a loaded pod), and four agents pulling one model at the same time.
Each hedge to a pod that does not own the chunk carries ``only-if-cached``, so only the
owner fills it.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from bdn.store import object_key
from tests.agent.agent_support import (
    Agent,
    Model,
    assert_mount_matches,
    http_json,
    start_proxy,
)
from tests.support.procs import ServiceProcess, bdn_command

pytestmark = pytest.mark.slow

STORE_HTTP = str(Path(__file__).resolve().parent.parent / "cache" / "store_http.py")
AGENTS = 4
FIRST_BYTE_TIMEOUT_S = 2.0
# Past the first-byte deadline, so every chunk the slow pod owns is hedged; within one
# more deadline, the grace an owner that has not answered gets once a hedge found the
# chunk uncached.
HOLD_MS = 3000


def _store_object_bytes(store_http: ServiceProcess) -> int:
    return int(http_json(f"{store_http.url}/_stats")["bytes"].get("objects", 0))


def test_n_agents_read_the_store_once_per_byte_with_a_slow_pod(
        tmp_path: Path, store: Path, base: Model, agents: list[Agent]) -> None:
    origin = ServiceProcess([sys.executable, STORE_HTTP, str(store), "--listen",
                             "127.0.0.1:0"], env={"PYTHONPATH": str(Path.cwd())})
    started: list[ServiceProcess] = [origin]
    try:
        pods = []
        for i in range(3):
            pod = ServiceProcess(bdn_command(
                "cache-server", "--store", str(origin.url), "--dir",
                str(tmp_path / f"pod{i}"), "--budget-bytes", "1G", "--listen",
                "127.0.0.1:0"))
            started.append(pod)
            pods.append(str(pod.url))
        slow = start_proxy(pods[2], "--hold-ms", str(HOLD_MS))
        started.append(slow)
        peers = (pods[0], pods[1], str(slow.url))
        extra = ("--strict", "--first-byte-timeout-s", str(FIRST_BYTE_TIMEOUT_S))
        for i in range(AGENTS):
            agents.append(Agent(tmp_path, peers=peers, name=f"node{i}", extra=extra))
        statuses: list[dict] = [{} for _ in agents]  # type: ignore[type-arg]
        barrier = threading.Barrier(AGENTS)

        def pull(i: int) -> None:
            client = agents[i].client
            barrier.wait()
            try:
                pid = client.start_pull(ref=base.ref, mount=str(tmp_path / f"m{i}"))["id"]
                statuses[i] = client.wait(pid)
            except Exception as e:  # reported by the assertion below
                statuses[i] = {"state": "failed", "error": repr(e)}

        threads = [threading.Thread(target=pull, args=(i,)) for i in range(AGENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, st in enumerate(statuses):
            assert st.get("state") == "done", st
            assert st["bytes_by_tier"]["cluster"] == base.manifest.unique_size
            assert_mount_matches(base.src, tmp_path / f"m{i}")
        # The hedges did fire: the slow pod's chunks were asked of another pod too.
        with urllib.request.urlopen(f"{slow.url}/proxy/stats", timeout=10) as r:
            held = sum(json.loads(r.read())["requests"].values())
        assert held > 0
        # Hedges went out: answered from another pod's cache, or refused there (504).
        hedged = sum(float(ln.split()[1]) for a in agents
                     for ln in a.client.metrics().splitlines()
                     if ln.startswith(("bdn_agent_timeout_answers_total ",
                                       "bdn_agent_uncached_answers_total ")))
        assert hedged > 0, "no first-byte deadline passed: nothing was hedged"
        # Every chunk once, and the manifest (an object too) once: nothing filled twice.
        manifest_bytes = (store / object_key(base.digest)).stat().st_size
        assert _store_object_bytes(origin) == base.manifest.unique_size + manifest_bytes
    finally:
        for p in reversed(started):
            p.stop()
