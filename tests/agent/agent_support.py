"""Helpers and fixtures for the agent's tests: small mirrored models, real services.

Models are mirrored with small chunk sizes so a 3.7 MB model has about a hundred chunks:
enough for ordering, reuse, kill points and failover to mean something while the whole
suite stays fast. Services (cache server, agent, test proxy) are real processes on
loopback, started by ``tests.support.procs.ServiceProcess`` (which waits for their
``BDN_LISTENING`` line) and stopped by PID.
"""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.client import AgentClient
from bdn.mirror import Mirror, MirrorOptions
from bdn.sources import open_source
from bdn.store import BlobStore, object_key
from manifests.chunking import ChunkingOptions
from manifests.digest import Digest
from manifests.manifest import Chunk, FileEntry, Manifest, canonical_json
from manifests.refs import Ref
from tests.support.models import write_model_dir
from tests.support.procs import ServiceProcess, bdn_command

SMALL_CHUNKS = ChunkingOptions(tensor_piece_bytes=64 * 1024, group_max_bytes=32 * 1024,
                               cdc_min_bytes=4096, cdc_avg_bytes=16384, cdc_max_bytes=65536,
                               small_file_bytes=16 * 1024)
PROXY_SCRIPT = str(Path(__file__).with_name("agent_proxy.py"))
CHANGED_TENSORS = ("model.layers.1.mlp.down_proj.weight", "lm_head.weight")


@dataclass
class Model:
    src: Path
    ref: str
    digest: Digest
    manifest: Manifest


def mirror(store: Path, src: Path, ref: str) -> Model:
    bs = BlobStore(str(store))
    source = open_source(str(src))
    try:
        result = Mirror(bs, MirrorOptions(chunking=SMALL_CHUNKS)).run(source, ref=Ref.parse(ref))
    finally:
        source.close()
    return Model(src, ref, result.manifest_digest, bs.get_manifest(result.manifest_digest))


def make_model(root: Path, *, changed: tuple[str, ...] = ()) -> Path:
    write_model_dir(root, layers=2, hidden=256, shards=2, changed=changed)
    # A duplicate file: the mount must hold it as a hardlink of the first.
    shutil.copyfile(root / "config.json", root / "nested" / "config-copy.json")
    return root


def plant_broken_model(store: Path, base: Model, ref: str) -> None:
    """A manifest sharing ``config.json`` with ``base`` plus a file whose only object is
    missing from the store: a pull of it links config.json, then fails."""
    data = b"this object is never stored"
    chunk = Chunk(Digest.of(data), 0, len(data))
    missing = FileEntry.from_chunks("weights-missing.bin", [chunk])
    doc = {"version": 1, "source": {},
           "files": [base.manifest.file("config.json").to_dict(), missing.to_dict()]}
    raw = canonical_json(doc)
    md = Digest.of(raw)
    bs = BlobStore(str(store))
    bs.backend.put(object_key(md), raw)
    bs.backend.put(f"manifests/{md.hex}", b"")
    ns, rest = ref.split("/")
    model, tag = rest.split(":")
    bs.backend.put(f"refs/{ns}/{model}/{tag}", f"{md}\n".encode())


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def base(tmp_path: Path, store: Path) -> Model:
    return mirror(store, make_model(tmp_path / "src-base"), "test/llama:base")


@pytest.fixture
def tuned(tmp_path: Path, store: Path, base: Model) -> Model:
    return mirror(store, make_model(tmp_path / "src-tuned", changed=CHANGED_TENSORS),
                  "test/llama:tuned")


@pytest.fixture
def cache_server(tmp_path: Path, store: Path) -> Iterator[ServiceProcess]:
    proc = start_cache_server(tmp_path, store, "cache-a")
    try:
        yield proc
    finally:
        proc.stop()


def start_cache_server(tmp_path: Path, store: Path, name: str) -> ServiceProcess:
    return ServiceProcess(bdn_command("cache-server", "--store", str(store), "--dir",
                                      str(tmp_path / name), "--budget-bytes", "1G",
                                      "--listen", "127.0.0.1:0"))


def start_proxy(upstream: str, *extra: str) -> ServiceProcess:
    return ServiceProcess([sys.executable, PROXY_SCRIPT, "--upstream", upstream, *extra])


class Agent:
    """A running ``bdn agent`` process and a client for it."""

    def __init__(self, tmp_path: Path, *, peers: tuple[str, ...] = (),
                 store: Path | None = None, budget: str = "1G", name: str = "node",
                 extra: tuple[str, ...] = (), socket: str | None = None,
                 umask: int | None = None) -> None:
        self.cache_dir = tmp_path / name
        self.socket = socket or str(tmp_path / f"{name}.sock")
        args = ["agent", "--cache-dir", str(self.cache_dir), "--budget-bytes", budget,
                "--socket", self.socket]
        if peers:
            args += ["--peers", ",".join(peers)]
        if store is not None:
            args += ["--store", str(store)]
        self.argv = bdn_command(*args, *extra)
        if umask is not None:  # the agent starts under this umask (set by a shell)
            self.argv = ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *self.argv]
        self.proc = ServiceProcess(self.argv)
        self.client = AgentClient(self.socket)

    def restart(self) -> None:
        self.proc = ServiceProcess(self.argv)

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    try:
        yield started
    finally:
        for a in started:
            a.stop()


def http_json(url: str) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def metric(url: str, name: str) -> float:
    """One unlabelled Prometheus counter from ``url``/metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)


def cache_requests(url: str) -> int:
    """Object and manifest requests a cache server answered (hits, misses, joiners)."""
    return int(sum(metric(url, f"bdn_cache_{n}_total")
                   for n in ("hits", "misses", "coalesced_waiters")))


def assert_mount_matches(src: Path, mount: Path, *, read_only: bool = True) -> None:
    """Same relative files, same bytes; files (and directories) without write bits."""
    want = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    got = sorted(p.relative_to(mount).as_posix() for p in mount.rglob("*") if p.is_file())
    assert got == want
    for rel in want:
        assert (mount / rel).read_bytes() == (src / rel).read_bytes(), rel
        if read_only:
            assert (mount / rel).stat().st_mode & 0o222 == 0, f"{rel} is writable"
    if read_only:
        for d in [mount, *(p for p in mount.rglob("*") if p.is_dir())]:
            assert d.stat().st_mode & 0o222 == 0, f"{d} is writable"
