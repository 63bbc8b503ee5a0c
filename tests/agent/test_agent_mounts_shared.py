"""Pulls that share a mount (replicas of one deployment on a node) never destroy each
other's files: concurrent pulls, a failing pull beside a good one, releases of one of
several pulls, and an agent restart in between.

Everything runs through a real ``bdn agent`` process over its unix socket, against a
real blob store; contents are compared by BLAKE3 digest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.client import AgentClient
from agent.errors import PullError
from manifests.digest import Digest
from tests.agent.agent_support import Agent, Model, plant_broken_model

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

ROUNDS = 20
PULLS_PER_ROUND = 3


def digests_of(root: Path) -> dict[str, Digest]:
    """Relative path → BLAKE3 of the bytes, for every regular file under ``root``."""
    return {p.relative_to(root).as_posix(): Digest.of(p.read_bytes())
            for p in root.rglob("*") if p.is_file()}


def run_together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` on threads released by one barrier; results (or exceptions) in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as e:  # collected and asserted on by the caller
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def pull_into(client: AgentClient, ref: str, mount: Path) -> str:
    started = client.start_pull(ref=ref, mount=str(mount))
    client.wait(started["id"])
    return str(started["id"])


def test_concurrent_pulls_and_releases_in_one_mount_lose_nothing(
        tmp_path: Path, base: Model, store: Path, agents: list[Agent]) -> None:
    agent = Agent(tmp_path, store=store)
    agents.append(agent)
    mount = tmp_path / "models" / "llama"
    want = digests_of(base.src)
    carried: str | None = None
    for rnd in range(ROUNDS):
        calls: list[Callable[[], Any]] = [
            lambda: pull_into(agent.client, base.ref, mount)
            for _ in range(PULLS_PER_ROUND)]
        if carried is not None:
            # The previous round's last pull is released while the new ones link.
            calls.append(lambda c=carried: agent.client.release(c))
        results = run_together(calls)
        errors = [r for r in results if isinstance(r, Exception)]
        assert errors == [], f"round {rnd}: {errors}"
        pulls = results[:PULLS_PER_ROUND]
        assert digests_of(mount) == want, f"round {rnd}: files missing or changed"
        # Two of three released at once: the third still holds every file.
        released = run_together([lambda p=p: agent.client.release(p) for p in pulls[:2]])
        assert [r["state"] for r in released] == ["released", "released"]
        assert digests_of(mount) == want, f"round {rnd}: a release took a live pull's files"
        carried = pulls[2]
    assert carried is not None
    agent.client.release(carried)
    assert not mount.exists(), "the last release removes what the agent created"
    assert (tmp_path / "models").is_dir()


def test_a_failing_pull_leaves_the_files_of_another_pull_in_the_mount(
        tmp_path: Path, base: Model, store: Path, agents: list[Agent]) -> None:
    plant_broken_model(store, base, "test/broken:v1")
    agent = Agent(tmp_path, store=store)
    agents.append(agent)
    want = digests_of(base.src)
    # One after the other: the good pull is done when the broken one fails.
    mount = tmp_path / "m1"
    pull_into(agent.client, base.ref, mount)
    with pytest.raises(PullError, match=r"weights-missing\.bin|object"):
        pull_into(agent.client, "test/broken:v1", mount)
    assert digests_of(mount) == want
    # At the same time, into a fresh mount.
    mount2 = tmp_path / "m2"
    good, bad = run_together([lambda: pull_into(agent.client, base.ref, mount2),
                              lambda: pull_into(agent.client, "test/broken:v1", mount2)])
    assert isinstance(good, str), good
    assert isinstance(bad, PullError), bad
    assert digests_of(mount2) == want


def test_mount_references_survive_an_agent_restart(
        tmp_path: Path, base: Model, store: Path, agents: list[Agent]) -> None:
    agent = Agent(tmp_path, store=store)
    agents.append(agent)
    mount = tmp_path / "m"
    first = pull_into(agent.client, base.ref, mount)
    second = pull_into(agent.client, base.ref, mount)
    agent.stop()
    agent.restart()
    agent.client.release(first)
    assert digests_of(mount) == digests_of(base.src), "the second pull still holds them"
    agent.client.release(second)
    assert not mount.exists()
