"""Transient faults between the agent and its cache peers, and bounds on chunk memory.

Real processes on loopback: a cache server, the test proxy (``agent_proxy.py``) in front
of it corrupting, truncating or refusing (503 + ``Retry-After``) object answers, and a
``bdn agent`` pulling through it. What must hold:

* strict mode with one peer rides out a corrupt or truncated answer (reported to the
  cache, the chunk asked again) and a few seconds of 503s — from the proxy, and from a
  real cache server whose blob store (served over HTTP) is down for a moment; it fails
  only when the per-chunk budget is spent, naming the chunk, the peer and what it
  answered;
* without strict mode a corrupt answer is asked again of the next cache peer before the
  blob store (counted at the store, which is served over HTTP behind a counting proxy);
* the retry policy is a pure function of the answers so far and ``now``;
* a manifest cannot name a chunk too large to buffer, and the receive-buffer pool stays
  under its byte cap whatever sizes pass through it.
"""

from __future__ import annotations

import contextlib
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import PullError
from agent.fetch import BufferPool
from agent.fetchpolicy import (
    BUSY,
    CORRUPT,
    ERROR,
    MISSING,
    STORE,
    TRUNCATED,
    Answer,
    ChunkRetryBudget,
    next_source,
)
from agent.options import AgentOptions
from bdn.retry import RetryPolicy
from cache.ring import manifest_objects, place
from manifests.digest import Digest
from manifests.errors import ManifestError
from manifests.manifest import MAX_CHUNK_BYTES, Chunk, file_digest, manifest_from_dict
from tests.agent.agent_support import (
    Agent,
    Model,
    assert_mount_matches,
    http_json,
    start_cache_server,
    start_proxy,
)
from tests.support.procs import ServiceProcess, bdn_command, free_port

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

MiB = 1024 * 1024
STORE_HTTP = str(Path(__file__).parents[1] / "cache" / "store_http.py")


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def _unique(model: Model) -> set[str]:
    return {str(d) for d in model.manifest.unique_chunks()}


@contextlib.contextmanager
def _strict_pull(tmp_path: Path, base: Model, cache_server: ServiceProcess,
                 agents: list[Agent], *proxy_args: str,
                 ) -> Iterator[tuple[Agent, dict[str, Any], dict[str, Any]]]:
    """A ``--strict`` agent whose one peer is the cache behind the fault proxy (started
    with ``proxy_args``) pulls ``base`` into ``tmp_path/m``; yields the agent, the pull's
    final status and the proxy's stats."""
    proxy = start_proxy(cache_server.url, *proxy_args)
    try:
        agent = Agent(tmp_path, peers=(proxy.url,), extra=("--strict",))
        agents.append(agent)
        st = agent.client.wait(agent.client.start_pull(ref=base.ref,
                                                       mount=str(tmp_path / "m"))["id"])
        yield agent, st, http_json(f"{proxy.url}/proxy/stats")
    finally:
        proxy.stop()


# -- strict mode, one peer: end to end -----------------------------------------------------


def test_strict_one_peer_corrupt_once_then_good_succeeds_and_reports(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    with _strict_pull(tmp_path, base, cache_server, agents,
                      "--corrupt", "1") as (agent, st, stats):
        assert st["state"] == "done"
        assert_mount_matches(base.src, tmp_path / "m")
        unique = _unique(base)
        assert set(stats["flipped"]) == unique
        assert set(stats["reports"]) == unique, "every bad answer was reported to the cache"
        assert all(stats["requests"][d] == 2 for d in unique), "each chunk asked again once"
        assert st["bytes_by_tier"]["cluster"] == base.manifest.unique_size
        text = agent.client.metrics()
        assert _metric(text, "bdn_agent_integrity_failures_total") == len(unique)
        assert _metric(text, "bdn_agent_bad_reports_total") == len(unique)
        assert _metric(text, "bdn_agent_chunk_retries_total") == len(unique)
        assert _metric(text, "bdn_agent_chunks_failed_total") == 0
        pool = _metric(text, "bdn_agent_buffer_pool_bytes")
        assert 0 < pool <= _metric(text, "bdn_agent_buffer_pool_max_bytes")


def test_strict_one_peer_truncated_answer_is_reported_and_asked_again(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    with _strict_pull(tmp_path, base, cache_server, agents,
                      "--truncate", "1") as (agent, st, stats):
        assert st["state"] == "done"
        assert_mount_matches(base.src, tmp_path / "m")
        unique = _unique(base)
        assert set(stats["truncated"]) == unique
        assert set(stats["reports"]) == unique, "every truncated answer was reported"
        text = agent.client.metrics()
        assert _metric(text, "bdn_agent_truncated_answers_total") == len(unique)
        assert _metric(text, "bdn_agent_bad_reports_total") == len(unique)
        assert _metric(text, "bdn_agent_integrity_failures_total") == 0


def test_strict_one_peer_rides_out_a_few_seconds_of_503_retry_after(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    with _strict_pull(tmp_path, base, cache_server, agents,
                      "--busy-for-s", "2.5") as (agent, st, stats):
        assert st["state"] == "done", st
        assert_mount_matches(base.src, tmp_path / "m")
        assert stats["busy"] > 0
        assert not stats["reports"], "a 503 is not corruption"
        text = agent.client.metrics()
        assert _metric(text, "bdn_agent_busy_answers_total") == stats["busy"]
        assert _metric(text, "bdn_agent_chunks_failed_total") == 0


def test_strict_one_peer_permanent_corruption_fails_naming_chunk_peer_and_answers(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    proxy = start_proxy(cache_server.url, "--corrupt", "-1")
    try:
        agent = Agent(tmp_path, peers=(proxy.url,),
                      extra=("--strict", "--max-connections", "1",
                             "--chunk-tries-per-source", "3"))
        agents.append(agent)
        mount = tmp_path / "m"
        with pytest.raises(PullError) as e:
            agent.client.wait(agent.client.start_pull(ref=base.ref, mount=str(mount))["id"])
        msg = str(e.value)
        named = [d for d in _unique(base) if d in msg]
        assert len(named) == 1, msg
        digest = named[0]
        assert proxy.url in msg and "strict" in msg and "3 tries" in msg, msg
        assert "3× corrupt" in msg and "digest mismatch" in msg, msg
        stats = http_json(f"{proxy.url}/proxy/stats")
        assert stats["requests"][digest] == 3, "asked again up to the bound, no more"
        assert stats["reports"][digest] == 3, "every bad answer reported, even on failure"
        text = agent.client.metrics()
        assert _metric(text, "bdn_agent_chunks_failed_total") >= 1
        assert _metric(text, "bdn_agent_integrity_failures_total") >= 3
        assert not mount.exists() or not any(p.is_file() for p in mount.rglob("*"))
    finally:
        proxy.stop()


def test_strict_pull_survives_the_cache_losing_its_blob_store_for_a_moment(
        tmp_path: Path, base: Model, agents: list[Agent]) -> None:
    """No proxy: the real cache server answers 503 + Retry-After while its store (served
    over HTTP) is down, and the strict pull goes on once the store is back."""
    store_dir = base.src.parent / "store"
    port = free_port()
    origin_cmd = [sys.executable, STORE_HTTP, str(store_dir), "--listen",
                  f"127.0.0.1:{port}"]
    origin = ServiceProcess(origin_cmd)
    cache = ServiceProcess(bdn_command(
        "cache-server", "--store", origin.url, "--dir", str(tmp_path / "cache"),
        "--budget-bytes", "1G", "--listen", "127.0.0.1:0"))
    try:
        # The manifest is cached while the store is up; its chunks are not.
        # The first answer can end before its fill is committed (later ones join the
        # fill: "coalesced"); ask until one is a hit, i.e. on the cache's disk.
        states = []
        while "hit" not in states and len(states) < 1000:
            with urllib.request.urlopen(f"{cache.url}/v1/manifests/{base.digest}",
                                        timeout=30) as r:
                states.append(r.headers["X-Bdn-Cache"])
        assert states[0] == "miss" and states[-1] == "hit", states
        origin.stop()
        agent = Agent(tmp_path, peers=(cache.url,), extra=("--strict",))
        agents.append(agent)
        pull = agent.client.start_pull(ref=str(base.digest), mount=str(tmp_path / "m"))
        agent.proc.wait_line("answered busy", timeout_s=60)
        origin = ServiceProcess(origin_cmd)  # the store is back on the same address
        st = agent.client.wait(pull["id"])
        assert st["state"] == "done" and st["bytes_by_tier"]["store"] == 0
        assert_mount_matches(base.src, tmp_path / "m")
        text = agent.client.metrics()
        assert _metric(text, "bdn_agent_busy_answers_total") > 0
        assert _metric(text, "bdn_agent_chunks_failed_total") == 0
    finally:
        cache.stop()
        origin.stop()


# -- not strict, two peers: the next peer before the store -----------------------------------


def test_not_strict_corrupt_peer_is_replaced_by_the_next_peer_not_the_store(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    store_dir = base.src.parent / "store"
    other = start_cache_server(tmp_path, store_dir, "cache-b")
    bad = start_proxy(cache_server.url, "--corrupt", "-1")
    good = start_proxy(other.url)
    origin = ServiceProcess([sys.executable, STORE_HTTP, str(store_dir)])
    counted_store = start_proxy(origin.url)
    try:
        agent = Agent(tmp_path, peers=(bad.url, good.url),
                      extra=("--store", counted_store.url))
        agents.append(agent)
        st = agent.client.wait(agent.client.start_pull(ref=base.ref,
                                                       mount=str(tmp_path / "m"))["id"])
        assert_mount_matches(base.src, tmp_path / "m")
        objects_read = {p: n for p, n in http_json(f"{counted_store.url}/proxy/stats")[
            "paths"].items() if p.startswith("/objects/")}
        assert objects_read == {}, "no chunk was read from the blob store"
        assert st["bytes_by_tier"]["store"] == 0
        assert st["bytes_by_tier"]["cluster"] == base.manifest.unique_size
        placement = place([bad.url, good.url], manifest_objects(base.manifest))
        owned_by_bad = {d for d in _unique(base) if placement.owner(d) == bad.url}
        assert owned_by_bad, "the corrupt peer owns some chunks"
        bad_stats = http_json(f"{bad.url}/proxy/stats")
        assert set(bad_stats["reports"]) == owned_by_bad
        assert owned_by_bad <= set(http_json(f"{good.url}/proxy/stats")["requests"])
        text = agent.client.metrics()
        assert _metric(text, "bdn_agent_integrity_failures_total") == len(owned_by_bad)
        assert _metric(text, "bdn_agent_bad_reports_total") == len(owned_by_bad)
    finally:
        for p in (counted_store, origin, good, bad, other):
            p.stop()


# -- the policy: pure -----------------------------------------------------------------------

BUDGET = ChunkRetryBudget(tries_per_source=3, wait_max_s=10.0,
                          backoff=RetryPolicy(attempts=3, base_delay_s=0.1, max_delay_s=2.0))
A, B = "http://a:1", "http://b:1"


def _ans(source: str, outcome: str, t: float, retry_after_s: float | None = None) -> Answer:
    return Answer(source, outcome, started_s=t, ended_s=t + 0.01, detail=outcome,
                  retry_after_s=retry_after_s)


def test_policy_asks_peers_in_order_then_the_store() -> None:
    assert next_source([], [A, B, STORE], BUDGET, now_s=0.0, draw=0.5).source == A
    step = next_source([_ans(A, CORRUPT, 0.0)], [A, B, STORE], BUDGET, now_s=0.1, draw=0.5)
    assert (step.source, step.at_s) == (B, 0.1), "the next peer at once, before the store"
    h = [_ans(A, CORRUPT, 0.0), _ans(B, ERROR, 0.1)]
    assert next_source(h, [A, B, STORE], BUDGET, now_s=0.2, draw=0.5).source == STORE


def test_policy_asks_one_peer_again_after_backoff_until_its_tries_are_spent() -> None:
    h = [_ans(A, CORRUPT, 0.0)]
    step = next_source(h, [A], BUDGET, now_s=0.01, draw=1.0)
    assert step.source == A and step.at_s == pytest.approx(0.01 + 0.1)
    h += [_ans(A, TRUNCATED, 1.0), _ans(A, CORRUPT, 2.0)]
    step = next_source(h, [A], BUDGET, now_s=3.0, draw=0.5)
    assert step.source is None and "3 tries" in step.reason


def test_policy_honours_retry_after_within_the_wait_budget() -> None:
    h = [_ans(A, BUSY, 0.0, retry_after_s=1.0)]
    step = next_source(h, [A], BUDGET, now_s=0.01, draw=0.0)
    assert step.source == A and step.at_s == pytest.approx(1.01)
    # Busy answers do not use up tries: only the wait budget bounds them.
    h = [_ans(A, BUSY, float(t), retry_after_s=1.0) for t in range(9)]
    assert next_source(h, [A], BUDGET, now_s=9.0, draw=0.0).source == A
    h.append(_ans(A, BUSY, 9.5, retry_after_s=1.0))
    step = next_source(h, [A], BUDGET, now_s=9.6, draw=0.0)
    assert step.source is None and "wait" in step.reason
    # A hostile Retry-After is capped by the backoff policy's max_retry_after_s.
    step = next_source([_ans(A, BUSY, 0.0, retry_after_s=1e9)], [A], ChunkRetryBudget(
        wait_max_s=1e6), now_s=0.01, draw=0.0)
    assert step.at_s <= 0.01 + RetryPolicy().max_retry_after_s


def test_policy_treats_missing_as_final_and_prefers_a_ready_source() -> None:
    step = next_source([_ans(A, MISSING, 0.0)], [A], BUDGET, now_s=0.1, draw=0.5)
    assert step.source is None and "missing" in step.reason
    h = [_ans(A, BUSY, 0.0, retry_after_s=5.0), _ans(B, ERROR, 0.0)]
    assert next_source(h, [A, B], BUDGET, now_s=0.2, draw=0.5).source == B


def test_options_validate_the_retry_bounds() -> None:
    with pytest.raises(ValueError, match="chunk_tries_per_source"):
        AgentOptions(cache_dir=Path("/tmp/x"), budget_bytes=1, peers=(A,),
                     chunk_tries_per_source=0)
    with pytest.raises(ValueError, match="chunk_retry_wait_max_s"):
        AgentOptions(cache_dir=Path("/tmp/x"), budget_bytes=1, peers=(A,),
                     chunk_retry_wait_max_s=-1)


# -- memory bounds ----------------------------------------------------------------------------


def _file_doc(lengths: list[int]) -> dict:  # type: ignore[type-arg]
    chunks, pos = [], 0
    for i, n in enumerate(lengths):
        chunks.append(Chunk(Digest.of(str(i).encode()), pos, n))
        pos += n
    return {"path": "model.safetensors", "size": pos, "mode": 0o644,
            "digest": str(file_digest(chunks)), "chunks": [c.to_dict() for c in chunks]}


def test_manifest_refuses_a_chunk_longer_than_the_maximum() -> None:
    assert MAX_CHUNK_BYTES == 64 * MiB
    ok = {"version": 1, "source": {}, "files": [_file_doc([MiB, MAX_CHUNK_BYTES])]}
    assert manifest_from_dict(ok).files[0].chunks[1].length == MAX_CHUNK_BYTES
    bad = {"version": 1, "source": {}, "files": [_file_doc([MiB, MAX_CHUNK_BYTES + 1])]}
    with pytest.raises(ManifestError) as e:
        manifest_from_dict(bad)
    assert e.value.record == "files[0].chunks[1]" and e.value.field == "length"
    msg = str(e.value)
    assert "model.safetensors" in msg and f"offset {MiB}" in msg and "64 MiB" in msg


def test_buffer_pool_stays_under_its_byte_cap_across_many_chunk_sizes() -> None:
    cap = 8 * MiB
    pool = BufferPool(max_bytes=cap)
    for size in range(1, 40):  # 39 size classes of 1 MiB grain
        buf = pool.get(size * MiB // 2 + 7)
        assert len(buf) >= size * MiB // 2 + 7
        pool.put(buf)
        assert pool.idle_bytes <= cap and pool.total_bytes <= max(cap, len(buf))
    held = [pool.get(MiB) for _ in range(6)]
    assert pool.live_bytes == 6 * MiB and pool.total_bytes <= cap
    for b in held:
        pool.put(b)
    assert pool.live_bytes == 0 and pool.idle_bytes <= cap
    again = pool.get(MiB)
    assert any(again is b for b in held), "a buffer of the same size is reused"
