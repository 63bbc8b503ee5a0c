"""End to end on loopback: blob store → cache server → agent → read-only mount.

Real processes only (cache server, agent); bytes and digests compared end to end,
network traffic counted at the cache server's ``/metrics``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from agent.client import AgentClient
from cache.node import NodeCache
from tests.agent.agent_support import (
    Agent,
    Model,
    assert_mount_matches,
    cache_requests,
    http_json,
    metric,
    start_proxy,
)
from tests.support.procs import ServiceProcess

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow


def test_pull_mounts_byte_identical_read_only_files(tmp_path: Path, base: Model,
                                                     cache_server: ServiceProcess,
                                                     agents: list[Agent]) -> None:
    agent = Agent(tmp_path, peers=(cache_server.url,), store=base.src.parent / "store")
    agents.append(agent)
    mount = tmp_path / "mnt" / "llama"
    started = agent.client.start_pull(ref=base.ref, mount=str(mount),
                                      idempotency_key="deploy-1")
    assert started["created"] is True
    events = list(agent.client.events(started["id"]))
    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan" and kinds[-1] == "done" and "error" not in kinds
    unique_chunks = len(base.manifest.unique_chunks())
    assert sum(1 for e in events if e["event"] == "chunk") >= unique_chunks
    # Every chunk event names verified bytes of the partial file it was written to.
    plan = events[0]
    assert {f["path"] for f in plan["files"]} == {f.path for f in base.manifest.files}
    first_chunk = next(e for e in events if e["event"] == "chunk" and e["length"] > 1000)
    assert first_chunk["disk_path"].startswith(str(agent.cache_dir))
    # Files are published only after all their chunks, in loader order (small files
    # before weights).
    order = [e["path"] for e in events if e["event"] == "file"]
    assert order.index("config.json") < order.index("model-00001-of-00002.safetensors")
    for f in base.manifest.files:
        published = next(i for i, e in enumerate(events)
                         if e["event"] == "file" and e["path"] == f.path)
        assert all(i < published for i, e in enumerate(events)
                   if e["event"] == "chunk" and e["path"] == f.path), f.path
    assert_mount_matches(base.src, mount)
    dup_a, dup_b = (mount / "config.json").stat(), (mount / "nested/config-copy.json").stat()
    assert dup_a.st_ino == dup_b.st_ino, "duplicate files are one inode"
    status = agent.client.status(started["id"])
    assert status["state"] == "done" and status["files_done"] == len(base.manifest.files)
    assert status["bytes_by_tier"]["cluster"] == base.manifest.unique_size
    assert status["bytes_by_tier"]["store"] == 0 and status["eta_s"] == 0.0
    # The cache server saw one request per unique chunk (plus the manifest).
    assert cache_requests(cache_server.url) == unique_chunks + 1

    # Same key, same body → the same pull; a different body → refused.
    again = agent.client.start_pull(ref=base.ref, mount=str(mount),
                                    idempotency_key="deploy-1")
    assert again["id"] == started["id"] and again["created"] is False
    try:
        agent.client.start_pull(ref=base.ref, mount=str(tmp_path / "elsewhere"),
                                idempotency_key="deploy-1")
        raise AssertionError("a reused key with another body must be refused")
    except Exception as e:
        assert "Idempotency-Key" in str(e)

    # A second mount of the same model on this node: all node cache, nothing fetched,
    # fast whatever the size.
    before = cache_requests(cache_server.url)
    t0 = time.monotonic()
    second = agent.client.start_pull(ref=base.ref, mount=str(tmp_path / "mnt2"))
    st2 = agent.client.wait(second["id"])
    assert time.monotonic() - t0 < 0.5
    assert st2["bytes_by_tier"] == {"node": base.manifest.total_size, "peer": 0,
                                    "cluster": 0, "store": 0}
    assert cache_requests(cache_server.url) == before + 1  # the manifest only
    assert_mount_matches(base.src, tmp_path / "mnt2")
    assert (tmp_path / "mnt2/config.json").stat().st_ino == dup_a.st_ino

    # DELETE releases the mount (and its pins); the other mount is untouched.
    agent.client.release(started["id"])
    assert not mount.exists()
    assert_mount_matches(base.src, tmp_path / "mnt2")
    assert agent.client.status(started["id"])["state"] == "released"


def test_fine_tune_fetches_only_changed_chunks(tmp_path: Path, base: Model, tuned: Model,
                                               cache_server: ServiceProcess,
                                               agents: list[Agent]) -> None:
    agent = Agent(tmp_path, peers=(cache_server.url,), store=base.src.parent / "store")
    agents.append(agent)
    agent.client.wait(agent.client.start_pull(ref=base.ref, mount=str(tmp_path / "b"))["id"])
    served = metric(cache_server.url, "bdn_cache_bytes_served_total")
    requests = cache_requests(cache_server.url)
    st = agent.client.wait(agent.client.start_pull(ref=tuned.ref,
                                                   mount=str(tmp_path / "t"))["id"])
    assert_mount_matches(tuned.src, tmp_path / "t")
    base_chunks = set(base.manifest.unique_chunks())
    new = {d: c for d, c in tuned.manifest.unique_chunks().items() if d not in base_chunks}
    new_bytes = sum(c.length for c in new.values())
    assert 0 < new_bytes < tuned.manifest.unique_size / 2
    # Over the network: exactly the new chunks (and the manifest).
    assert cache_requests(cache_server.url) - requests == len(new) + 1
    manifest_bytes = len(tuned.manifest.canonical_bytes())
    assert metric(cache_server.url, "bdn_cache_bytes_served_total") - served == (
        new_bytes + manifest_bytes)
    assert st["bytes_by_tier"]["cluster"] == new_bytes
    assert st["bytes_by_tier"]["node"] == tuned.manifest.total_size - new_bytes
    assert st["bytes_by_tier"]["store"] == 0


def test_two_concurrent_pulls_fetch_each_chunk_once(tmp_path: Path, base: Model,
                                                    cache_server: ServiceProcess,
                                                    agents: list[Agent]) -> None:
    # A slow link (the proxy holds each response 10 ms) makes the two pulls overlap.
    proxy = start_proxy(cache_server.url, "--delay-ms", "10")
    try:
        agent = Agent(tmp_path, peers=(proxy.url,), store=base.src.parent / "store",
                      extra=("--max-connections", "2"))
        agents.append(agent)
        results: dict[str, dict] = {}  # type: ignore[type-arg]
        barrier = threading.Barrier(2)

        def pull(name: str) -> None:
            client = AgentClient(agent.socket)
            barrier.wait()
            results[name] = client.wait(client.start_pull(
                ref=base.ref, mount=str(tmp_path / name))["id"])

        threads = [threading.Thread(target=pull, args=(n,)) for n in ("one", "two")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(results) == {"one", "two"}
        for name in ("one", "two"):
            assert_mount_matches(base.src, tmp_path / name)
            # Both pulls received network bytes: they really ran at the same time.
            assert results[name]["bytes_by_tier"]["cluster"] > 0
        requests = http_json(f"{proxy.url}/proxy/stats")["requests"]
        assert set(requests) == {str(d) for d in base.manifest.unique_chunks()}
        assert set(requests.values()) == {1}, "each chunk crossed the network once"
        assert cache_requests(cache_server.url) == len(requests) + 2  # + two manifests
    finally:
        proxy.stop()


def test_prewarm_fills_the_node_cache_without_mounting(tmp_path: Path, base: Model,
                                                       cache_server: ServiceProcess,
                                                       agents: list[Agent]) -> None:
    agent = Agent(tmp_path, peers=(cache_server.url,), store=base.src.parent / "store")
    agents.append(agent)
    st = agent.client.wait(agent.client.start_pull(ref=base.ref, prewarm=True)["id"])
    assert st["mounts"] == [] and st["state"] == "done"
    node = agent.client.agent_status()["node_cache"]
    assert node["files"] == len({f.digest for f in base.manifest.files})
    assert node["bytes_pinned"] == 0, "a pre-warm pull holds no pins once done"
    before = cache_requests(cache_server.url)
    agent.client.wait(agent.client.start_pull(ref=base.ref, mount=str(tmp_path / "m"))["id"])
    assert cache_requests(cache_server.url) == before + 1
    assert_mount_matches(base.src, tmp_path / "m")
    agent.stop()
    node_cache = NodeCache(agent.cache_dir, 1 << 30)
    assert node_cache.recover() == {"orphan_files": 0, "missing_files": 0,
                                    "orphan_partials": 0, "adopted_files": 0}
    node_cache.close()
    assert not any(os.scandir(agent.cache_dir / "partial"))


def test_serving_readiness_reads_the_event_stream(tmp_path: Path, base: Model,
                                                  cache_server: ServiceProcess,
                                                  agents: list[Agent]) -> None:
    """The serving loader's readiness source consumes these events over the socket."""
    readiness = __import__("pytest").importorskip("serving.readiness")
    agent = Agent(tmp_path, peers=(cache_server.url,), store=base.src.parent / "store")
    agents.append(agent)
    mount = tmp_path / "m"
    started = agent.client.start_pull(ref=base.ref, mount=str(mount))
    source = readiness.EventStreamReadiness(agent.client.events_url(started["id"]), mount)
    try:
        shard = "model-00002-of-00002.safetensors"
        want = (base.src / shard).read_bytes()
        where = source.wait_range(str(mount / shard), 0, 1024, timeout_s=30)
        with open(where, "rb") as f:  # the partial file or the mount: either is right
            assert f.read(1024) == want[:1024]
        final = source.wait_complete(str(mount / shard), timeout_s=30)
        assert Path(final).read_bytes() == want
        listing = source.listing(str(mount), timeout_s=30)
        assert listing is not None and str(mount / "config.json") in listing
    finally:
        source.close()
    agent.client.wait(started["id"])
