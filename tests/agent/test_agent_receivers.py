"""Holders that are still receiving, on loopback: real agents serve chunks they are
still fetching to agents that ask at the same time.

One store, one cache server (which keeps the record of holders and receivers), agents
with ``--peer-listen``. Agent A reaches the pod through a proxy that holds every object
answer for a while, so A is still *receiving* its chunks when agents B and C start
pulling the same model: the pod points them at A (the lookup recorded A as receiving),
A's peer listener waits until its receive verified and then serves. Also: a receiver
SIGKILLed while others wait on it costs them a prompt fallback to the pod, not its wait;
and a corrupt answer from a receiver is still detected, reported and asked again.
"""

from __future__ import annotations

import time
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

# Real service processes: left out of `make test-fast`.
pytestmark = pytest.mark.slow

# Long enough that agents started after A's first object request find A receiving.
HOLD_MS = 3000
# Receivers are waited for up to the first-byte deadline (agent/fetchpolicy.py
# receiver_wait_s's floor): well above HOLD_MS here, so a wait is never cut short.
FIRST_BYTE_S = 10.0
WAIT_TIMEOUT_S = 60.0


def _peer_agent(tmp_path: Path, name: str, cache: str, *,
                advertise: str | None = None) -> tuple[Agent, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = ["--strict", "--peer-listen", f"127.0.0.1:{port}",
             "--first-byte-timeout-s", str(FIRST_BYTE_S)]
    if advertise:
        extra += ["--peer-advertise", advertise]
    a = Agent(tmp_path, peers=(cache,), name=name, extra=tuple(extra))
    a.proc.wait_line(f"BDN_PEER_LISTENING {url}")
    return a, url


def _counters(agent: Agent) -> dict[str, float]:
    return {k: v for k, v in parse_metrics(agent.client.metrics()).items()
            if k.startswith("bdn_agent_")}


def _wait_for(what: str, probe: object) -> None:
    """Until ``probe()`` is true (each probe a round trip to a real process)."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not probe():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"never: {what}"


def _slow_cache(cache_server: ServiceProcess) -> ServiceProcess:
    return start_proxy(str(cache_server.url), "--hold-ms", str(HOLD_MS))


def test_agents_pulling_at_once_are_served_by_a_peer_still_receiving(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    cache = str(cache_server.url)
    slow = _slow_cache(cache_server)
    try:
        a, _ = _peer_agent(tmp_path, "node-a", str(slow.url))
        agents.append(a)
        others = []
        for name in ("node-b", "node-c"):
            agent, _ = _peer_agent(tmp_path, name, cache)
            agents.append(agent)
            others.append(agent)
        pull_a = a.client.start_pull(ref=base.ref, mount=str(tmp_path / "node-a-m"))["id"]
        # A's first object request reached the pod (its lookup recorded it receiving).
        _wait_for("A asked the pod for an object",
                  lambda: http_json(f"{slow.url}/proxy/stats")["requests"])
        pulls = [(o, o.client.start_pull(ref=base.ref, mount=str(tmp_path / f"m{i}"))["id"])
                 for i, o in enumerate(others)]
        results = [(o, o.client.wait(pid)) for o, pid in pulls]
        st_a = a.client.wait(pull_a)
        assert st_a["state"] == "done", st_a
        assert_mount_matches(base.src, tmp_path / "node-a-m")
        for i, (o, st) in enumerate(results):
            assert st["state"] == "done", st
            # Digests compare equal end to end: every byte verified, mounts exact.
            assert_mount_matches(base.src, tmp_path / f"m{i}")
            tiers = st["bytes_by_tier"]
            assert tiers["peer"] + tiers["cluster"] == base.manifest.unique_size, tiers
            assert tiers["store"] == 0
            c = _counters(o)
            assert c['bdn_agent_delivered_bytes_total{tier="peer"}'] == tiers["peer"]
            assert c["bdn_agent_integrity_failures_total"] == 0
        waited = sum(_counters(x)["bdn_agent_peer_uploads_after_wait_total"] for x in agents)
        assert waited >= 1, "no chunk was served by a peer that was still receiving it"
        assert sum(st["bytes_by_tier"]["peer"] for _, st in results) > 0
    finally:
        slow.stop()


def test_a_receiver_killed_mid_receive_costs_the_others_only_the_fallback(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    cache = str(cache_server.url)
    slow = _slow_cache(cache_server)
    try:
        a, _ = _peer_agent(tmp_path, "node-a", str(slow.url))
        agents.append(a)
        b, _ = _peer_agent(tmp_path, "node-b", cache)
        agents.append(b)
        a.client.start_pull(ref=base.ref, mount=str(tmp_path / "node-a-m"))
        _wait_for("A asked the pod for an object",
                  lambda: http_json(f"{slow.url}/proxy/stats")["requests"])
        pull_b = b.client.start_pull(ref=base.ref, mount=str(tmp_path / "mb"))["id"]
        _wait_for("B waits on A's receive",
                  lambda: _counters(a)["bdn_agent_peer_receiving_waits_total"] >= 1)
        a.proc.kill9()
        killed = time.monotonic()
        st = b.client.wait(pull_b)
        took = time.monotonic() - killed
        assert st["state"] == "done", st
        assert_mount_matches(base.src, tmp_path / "mb")
        # B fell back to the pod at once (connection refused or reset), not after the
        # receiver's wait and its first-byte deadline (2 × FIRST_BYTE_S here).
        assert took < 2 * FIRST_BYTE_S, took
        assert st["bytes_by_tier"]["cluster"] > 0
    finally:
        slow.stop()


def test_a_corrupt_answer_from_a_receiver_is_detected_reported_and_asked_again(
        tmp_path: Path, base: Model, cache_server: ServiceProcess,
        agents: list[Agent]) -> None:
    cache = str(cache_server.url)
    slow = _slow_cache(cache_server)
    port_a = free_port()
    # Every object answer of peer A flips a bit on the way; A advertises the proxy.
    bad = start_proxy(f"http://127.0.0.1:{port_a}", "--corrupt", "-1")
    try:
        a = Agent(tmp_path, peers=(str(slow.url),), name="node-a", extra=(
            "--strict", "--peer-listen", f"127.0.0.1:{port_a}", "--peer-advertise",
            str(bad.url), "--first-byte-timeout-s", str(FIRST_BYTE_S)))
        agents.append(a)
        a.proc.wait_line(f"BDN_PEER_LISTENING http://127.0.0.1:{port_a}")
        b, _ = _peer_agent(tmp_path, "node-b", cache)
        agents.append(b)
        a.client.start_pull(ref=base.ref, mount=str(tmp_path / "node-a-m"))
        _wait_for("A asked the pod for an object",
                  lambda: http_json(f"{slow.url}/proxy/stats")["requests"])
        st = b.client.wait(b.client.start_pull(ref=base.ref, mount=str(tmp_path / "mb"))["id"])
        assert st["state"] == "done", st
        assert_mount_matches(base.src, tmp_path / "mb")
        assert st["bytes_by_tier"]["peer"] == 0
        assert st["bytes_by_tier"]["cluster"] == base.manifest.unique_size
        stats = http_json(f"{bad.url}/proxy/stats")
        assert stats["flipped"], "A was asked and its answers corrupted"
        assert _counters(a)["bdn_agent_peer_uploads_after_wait_total"] >= 1
        counters = _counters(b)
        assert counters["bdn_agent_integrity_failures_total"] == len(stats["flipped"])
        assert set(stats["reports"]) == set(stats["flipped"])
        assert counters["bdn_agent_chunk_retries_total"] >= len(stats["flipped"])
    finally:
        bad.stop()
        slow.stop()
