"""Failures: kill -9 and resume, dead peers, strict mode, corrupted bytes.

Real processes on loopback. A test proxy (``agent_proxy.py``) stands between the agent
and a cache server where a test needs to count requests per digest, slow a transfer
down (so a kill lands mid-pull) or flip a bit; the agent and cache server themselves
are never mocked.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agent.errors import PullError
from cache.node import NodeCache, content_key
from cache.ring import manifest_objects, place
from manifests.digest import Digest
from tests.agent.agent_support import (
    Agent,
    Model,
    assert_mount_matches,
    http_json,
    start_cache_server,
    start_proxy,
)
from tests.support.procs import ServiceProcess

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow


def _completed_chunks(cache_dir: Path, model: Model) -> set[Digest]:
    """Chunks the node has verified (journaled, or in complete files), read after a kill."""
    node = NodeCache(cache_dir, 1 << 30)
    try:
        done: set[Digest] = set()
        for f in model.manifest.files:
            key = content_key(f)
            if node.has_file(key):
                done.update(c.digest for c in f.chunks)
            done.update(node.journal(key).values())
        return done
    finally:
        node.close()


def _assert_no_partial_file_visible(src: Path, mount: Path) -> None:
    if not mount.exists():
        return
    for p in mount.rglob("*"):
        if p.is_file():
            rel = p.relative_to(mount)
            assert p.read_bytes() == (src / rel).read_bytes(), f"{rel} visible but partial"


def test_kill9_at_random_points_resumes_without_refetching(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    proxy = start_proxy(cache_server.url, "--delay-ms", "15")
    try:
        # Strict: every object byte goes through the counting proxy.
        agent = Agent(tmp_path, peers=(proxy.url,), extra=("--strict", "--max-connections",
                                                           "2"))
        agents.append(agent)
        mount = tmp_path / "mnt"
        rng = random.Random(5)
        started = agent.client.start_pull(ref=base.ref, mount=str(mount),
                                          idempotency_key="kill-test")
        pull_id = started["id"]
        checkpoints: list[tuple[set[Digest], dict[str, int]]] = []
        for _ in range(3):
            kill_after = rng.randint(3, 10)
            fetched = 0
            for ev in agent.client.events(pull_id):
                if ev["event"] == "chunk" and ev["tier"] != "node":
                    fetched += 1
                    if fetched >= kill_after:
                        agent.proc.kill9()
                        break
                assert ev["event"] not in ("done", "error"), "the pull ended before the kill"
            _assert_no_partial_file_visible(base.src, mount)
            done = _completed_chunks(agent.cache_dir, base)
            assert done, "some chunks were verified before the kill"
            checkpoints.append((done, http_json(f"{proxy.url}/proxy/stats")["requests"]))
            agent.restart()  # resumes the persisted pull by itself
            again = agent.client.start_pull(ref=base.ref, mount=str(mount),
                                            idempotency_key="kill-test")
            assert again["id"] == pull_id and again["created"] is False
        status = agent.client.wait(pull_id)
        assert status["state"] == "done"
        assert_mount_matches(base.src, mount)
        final = http_json(f"{proxy.url}/proxy/stats")["requests"]
        for done, before in checkpoints:
            refetched = [str(d) for d in done if final.get(str(d), 0) > before.get(str(d), 0)]
            assert refetched == [], "chunks completed before a kill were fetched again"
        # Each chunk crossed the network at most once per kill (the ones in flight).
        assert sum(final.values()) <= len(base.manifest.unique_chunks()) + 3 * 2
        assert len(checkpoints[-1][0]) > len(checkpoints[0][0])
    finally:
        proxy.stop()


def test_dead_peer_mid_pull_fails_over_to_the_next_peer(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    store = base.src.parent / "store"
    other = start_cache_server(tmp_path, store, "cache-b")
    proxy_a = start_proxy(cache_server.url, "--delay-ms", "10")
    proxy_b = start_proxy(other.url)
    try:
        agent = Agent(tmp_path, peers=(proxy_a.url, proxy_b.url), store=store,
                      extra=("--max-connections", "2"))
        agents.append(agent)
        started = agent.client.start_pull(ref=base.ref, mount=str(tmp_path / "m"))
        fetched = 0
        for ev in agent.client.events(started["id"]):
            if ev["event"] == "chunk" and ev["tier"] == "cluster":
                fetched += 1
                if fetched == 5:
                    proxy_a.kill9()
            if ev["event"] in ("done", "error"):
                assert ev["event"] == "done", ev
                break
        assert_mount_matches(base.src, tmp_path / "m")
        st = agent.client.status(started["id"])
        assert st["bytes_by_tier"]["cluster"] == base.manifest.unique_size
        placement = place([proxy_a.url, proxy_b.url], manifest_objects(base.manifest))
        owned_by_a = {str(d) for d in base.manifest.unique_chunks()
                      if placement.owner(str(d)) == proxy_a.url}
        served_by_b = set(http_json(f"{proxy_b.url}/proxy/stats")["requests"])
        assert owned_by_a & served_by_b, "chunks owned by the dead peer came from the next"
    finally:
        proxy_a.stop()
        proxy_b.stop()
        other.stop()


def test_strict_mode_gives_a_clear_error_when_no_peer_can_serve(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    proxy = start_proxy(cache_server.url, "--delay-ms", "10")
    try:
        agent = Agent(tmp_path, peers=(proxy.url,), extra=("--strict", "--max-connections",
                                                           "1"))
        agents.append(agent)
        mount = tmp_path / "m"
        started = agent.client.start_pull(ref=base.ref, mount=str(mount))
        last = None
        for ev in agent.client.events(started["id"]):
            if ev["event"] == "chunk" and ev["tier"] == "cluster":
                proxy.kill9()
            last = ev
        assert last is not None and last["event"] == "error"
        assert "strict mode" in last["message"] and "3 tries" in last["message"]
        st = agent.client.status(started["id"])
        assert st["state"] == "failed" and "strict" in st["error"]
        with pytest.raises(PullError):
            agent.client.wait(started["id"])
        _assert_no_partial_file_visible(base.src, mount)
        assert not mount.exists() or not any(p.is_file() for p in mount.rglob("*")), (
            "a failed pull leaves nothing published")
    finally:
        proxy.stop()


def test_flipped_bit_is_detected_reported_and_refetched(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    proxy = start_proxy(cache_server.url, "--flip")
    try:
        agent = Agent(tmp_path, peers=(proxy.url,), store=base.src.parent / "store")
        agents.append(agent)
        st = agent.client.wait(agent.client.start_pull(ref=base.ref,
                                                       mount=str(tmp_path / "m"))["id"])
        assert_mount_matches(base.src, tmp_path / "m")
        stats = http_json(f"{proxy.url}/proxy/stats")
        flipped = set(stats["flipped"])
        assert len(flipped) == len(base.manifest.unique_chunks())
        assert set(stats["reports"]) == flipped, "every bad copy was reported to the cache"
        # Refetched from the other tier (the store: this agent knows one peer).
        assert st["bytes_by_tier"]["store"] == base.manifest.unique_size
        assert st["bytes_by_tier"]["cluster"] == 0
        text = agent.client.metrics()
        assert f"bdn_agent_integrity_failures_total {float(len(flipped))}\n" in text
    finally:
        proxy.stop()
