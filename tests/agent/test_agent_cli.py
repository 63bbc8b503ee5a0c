"""The CLI: ``bdn pull`` through a running agent or standalone, ``bdn agent status``,
and ``weights:`` entries resolved by the documented mirror ref."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bdn.config import parse_weights
from bdn.mirror_key import mirror_ref
from bdn.store import BlobStore
from tests.agent.agent_support import Agent, Model, assert_mount_matches
from tests.support.procs import ServiceProcess, bdn_command

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow


def _bdn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(bdn_command(*args), capture_output=True, text=True, timeout=120,
                          check=False)


def test_config_pull_standalone_resolves_entries_by_mirror_ref(
        tmp_path: Path, base: Model, store: Path) -> None:
    entry = {"source": "hf://acme/llama@0123abc", "mount_location": "/models/llama",
             "allow_patterns": ["*.safetensors", "*.json"]}
    # The mirror service stores an entry's mirror under mirror_ref(entry).
    (parsed,) = parse_weights([entry])
    BlobStore(str(store)).set_ref(mirror_ref(parsed), base.digest)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.yaml").write_text(json.dumps({"weights": [entry]}))
    root = tmp_path / "root"
    out = _bdn("pull", str(tmp_path / "cfg"), "--to", str(root), "--standalone",
               "--store", str(store), "--cache-dir", str(tmp_path / "node"), "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["state"] == "done" and status["bytes_by_tier"]["store"] > 0
    mount = root / "models" / "llama"
    assert status["mounts"] == [str(mount)]
    # "*" crosses "/" (as in huggingface_hub): nested JSON files are selected too.
    want = sorted(f.path for f in base.manifest.files
                  if f.path.endswith((".safetensors", ".json")))
    got = sorted(p.relative_to(mount).as_posix() for p in mount.rglob("*") if p.is_file())
    assert got == want, "allow_patterns select the files"
    for rel in got:
        assert (mount / rel).read_bytes() == (base.src / rel).read_bytes()


def test_pull_goes_through_the_running_agent(tmp_path: Path, base: Model,
                                             cache_server: ServiceProcess,
                                             agents: list[Agent]) -> None:
    agent = Agent(tmp_path, peers=(cache_server.url,), store=base.src.parent / "store")
    agents.append(agent)
    out = _bdn("pull", base.ref, "--to", str(tmp_path / "m"), "--socket", agent.socket)
    assert out.returncode == 0, out.stderr
    assert "via the agent" in out.stdout and "cluster" in out.stdout
    assert_mount_matches(base.src, tmp_path / "m")
    st = _bdn("agent", "status", "--socket", agent.socket, "--json")
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["pulls"] == {"done": 1}
    assert doc["node_cache"]["bytes_pinned"] > 0 and doc["ring_client"] is True
    human = _bdn("agent", "status", "--socket", agent.socket)
    assert "node cache" in human.stdout and "pulls: done 1" in human.stdout
    # With no agent on the socket, `bdn agent status` says so plainly.
    agent.stop()
    gone = _bdn("agent", "status", "--socket", agent.socket)
    assert gone.returncode == 1 and "did not answer" in gone.stderr


def test_pull_events_prints_ndjson_only(tmp_path: Path, base: Model, store: Path) -> None:
    out = _bdn("pull", base.ref, "--to", str(tmp_path / "m"), "--standalone", "--events",
               "--store", str(store), "--cache-dir", str(tmp_path / "node"))
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert events and all("event" in e for e in events)
    assert events[-1]["event"] == "summary" and events[-1]["state"] == "done"
    assert_mount_matches(base.src, tmp_path / "m")


def test_pull_bar_counts_bytes_already_on_the_node() -> None:
    """A warm pull's files come from the node cache without chunk events; its bar must
    still reach the plan's total (fails on main before this change: it stayed at 0)."""
    import io

    from rich.console import Console

    from agent.cli import _TierBar
    from agent.events import Done, FilePublished, Plan, PlannedFile

    bar = _TierBar(enabled=False)
    bar.console = Console(file=io.StringIO(), force_terminal=True)
    bar.enabled = True
    with bar:
        bar(Plan(bytes=300, files=(PlannedFile(path="a", size=200),
                                   PlannedFile(path="b", size=100)),
                 bytes_cached=200, bytes_resumed=40, bytes_local=0, bytes_network=60,
                 bytes_duplicate=0).to_json())
        bar({"event": "chunk", "path": "b", "offset": 40, "length": 60, "tier": "cluster"})
        bar(FilePublished(path="a", size=200).to_json())
        bar(FilePublished(path="b", size=100).to_json())
        task = bar.progress.tasks[0]
        assert task.completed == 300 and task.total == 300
        bar(Done(seconds=0.1).to_json())
        assert bar.progress.tasks[0].completed == 300
