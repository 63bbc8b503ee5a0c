"""Node-to-node sharing on loopback: real agents serve verified chunks to each other.

One store, one cache server (which keeps the record of holders), agents with
``--peer-listen``. The first agent pulls from the cache and announces what it holds;
the second finds it through the cache pod, fetches from it and verifies every byte;
a corrupting proxy in front of a peer shows a bad answer is detected, reported and
asked again elsewhere.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bdn.metrics import parse_metrics
from tests.agent.agent_support import (
    Agent,
    Model,
    assert_mount_matches,
    http_json,
    start_proxy,
)
from tests.support.procs import ServiceProcess, free_port

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

ANNOUNCE_TIMEOUT_S = 30.0


def _peer_args(port: int, advertise: str | None = None) -> tuple[str, ...]:
    args = ("--peer-listen", f"127.0.0.1:{port}")
    return args + (("--peer-advertise", advertise) if advertise else ())


def _wait_announced(cache_url: str, model: Model, holder: str) -> None:
    """Until the cache pod names ``holder`` for every chunk (each probe a round trip)."""
    deadline = time.monotonic() + ANNOUNCE_TIMEOUT_S
    pending = {str(d) for d in model.manifest.unique_chunks()}
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} chunks never announced"
        for d in list(pending):
            if holder in http_json(f"{cache_url}/v1/holders/{d}")["holders"]:
                pending.discard(d)


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _counters(agent: Agent) -> dict[str, float]:
    return {k: v for k, v in parse_metrics(agent.client.metrics()).items()
            if k.startswith("bdn_agent_")}


def test_a_peer_agent_serves_chunks_another_agent_verifies(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    cache = str(cache_server.url)
    port_a = free_port()
    url_a = f"http://127.0.0.1:{port_a}"
    a = Agent(tmp_path, peers=(cache,), name="node-a", extra=("--strict", *_peer_args(port_a)))
    agents.append(a)
    a.proc.wait_line(f"BDN_PEER_LISTENING {url_a}")
    st_a = a.client.wait(a.client.start_pull(ref=base.ref, mount=str(tmp_path / "ma"))["id"])
    assert st_a["state"] == "done" and st_a["bytes_by_tier"]["peer"] == 0
    _wait_announced(cache, base, url_a)

    # The peer listener speaks the cache's object protocol for chunks it holds.
    chunk = max(base.manifest.unique_chunks().values(), key=lambda c: c.length)
    data = (base.src / next(f.path for f in base.manifest.files
                            if any(c.digest == chunk.digest for c in f.chunks))).read_bytes()
    status, body = _get(f"{url_a}/v1/objects/{chunk.digest}", {"Range": "bytes=10-99"})
    assert status == 206 and len(body) == 90
    assert _get(f"{url_a}/v1/objects/b3:{'0' * 64}")[0] == 404
    assert _get(f"{url_a}/v1/objects/not-a-digest")[0] == 400
    assert _get(f"{url_a}/v1/objects/..%2f..%2fetc%2fpasswd")[0] in (400, 404)
    assert data  # the chunk's file is in the model

    port_b = free_port()
    b = Agent(tmp_path, peers=(cache,), name="node-b", extra=("--strict", *_peer_args(port_b)))
    agents.append(b)
    st_b = b.client.wait(b.client.start_pull(ref=base.ref, mount=str(tmp_path / "mb"))["id"])
    assert st_b["state"] == "done", st_b
    assert_mount_matches(base.src, tmp_path / "mb")
    tiers = st_b["bytes_by_tier"]
    # Every chunk was asked of the peer first; a busy peer (bounded uploads) sends the
    # rest to the pod.
    assert tiers["peer"] > 0, tiers
    assert tiers["peer"] + tiers["cluster"] == base.manifest.unique_size
    assert tiers["store"] == 0
    assert _counters(a)["bdn_agent_peer_upload_bytes_total"] >= tiers["peer"]
    assert _counters(b)['bdn_agent_delivered_bytes_total{tier="peer"}'] == tiers["peer"]
    assert _counters(b)["bdn_agent_integrity_failures_total"] == 0


def test_a_corrupt_peer_answer_is_detected_reported_and_asked_again(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    cache = str(cache_server.url)
    port_a = free_port()
    # Every object answer of peer A flips a bit on the way; A advertises the proxy.
    proxy = start_proxy(f"http://127.0.0.1:{port_a}", "--corrupt", "-1")
    try:
        a = Agent(tmp_path, peers=(cache,), name="node-a",
                  extra=("--strict", *_peer_args(port_a, str(proxy.url))))
        agents.append(a)
        st_a = a.client.wait(a.client.start_pull(ref=base.ref, mount=str(tmp_path / "ma"))["id"])
        assert st_a["state"] == "done"
        _wait_announced(cache, base, str(proxy.url))
        b = Agent(tmp_path, peers=(cache,), name="node-b", extra=("--strict",
                                                                   *_peer_args(free_port())))
        agents.append(b)
        st_b = b.client.wait(b.client.start_pull(ref=base.ref, mount=str(tmp_path / "mb"))["id"])
        assert st_b["state"] == "done", st_b
        assert_mount_matches(base.src, tmp_path / "mb")
        assert st_b["bytes_by_tier"]["peer"] == 0
        assert st_b["bytes_by_tier"]["cluster"] == base.manifest.unique_size
        stats = http_json(f"{proxy.url}/proxy/stats")
        assert stats["flipped"], "the peer was asked and its answers corrupted"
        counters = _counters(b)
        # Each corrupt answer was detected, reported to the peer that sent it, and the
        # chunk asked again of the pod.
        assert counters["bdn_agent_integrity_failures_total"] == len(stats["flipped"])
        assert set(stats["reports"]) == set(stats["flipped"])
        assert counters["bdn_agent_chunk_retries_total"] >= len(stats["flipped"])
    finally:
        proxy.stop()


def test_peer_options_are_validated(tmp_path: Path) -> None:
    from agent.options import AgentOptions

    for bad, match in ((dict(peer_advertise="ftp://x"), "peer_advertise"),
                       (dict(peer_max_uploads=0), "peer_max_uploads"),
                       (dict(peer_advertise="http://x:7471", peers=()), "needs cache peers")):
        kw: dict[str, object] = {"cache_dir": tmp_path, "budget_bytes": 0,
                                 "store_url": str(tmp_path), "peers": ("http://c:8401",)}
        kw.update(bad)
        with pytest.raises(ValueError, match=match):
            AgentOptions(**kw)  # type: ignore[arg-type]
