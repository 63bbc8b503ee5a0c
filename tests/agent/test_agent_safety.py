"""Refusals before any write: hostile paths, planted symlinks, budgets, a full disk.

These run the real engine in-process (``agent.cli.run_standalone``, the same code the
daemon runs) against a real blob store: no service is needed to refuse a pull.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import build_request, run_standalone
from agent.client import AgentClient
from agent.engine import parse_request
from agent.errors import PullError
from agent.options import AgentOptions
from bdn.errors import PathError
from bdn.store import BlobStore, object_key
from cache.node import NodeCache
from manifests.digest import Digest
from manifests.manifest import Chunk, canonical_json, file_digest
from tests.agent.agent_support import Agent, Model, assert_mount_matches, plant_broken_model

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow


def _options(tmp_path: Path, store: Path, budget: int = 1 << 30,
             cache: Path | None = None) -> AgentOptions:
    return AgentOptions(cache_dir=cache or tmp_path / "node", budget_bytes=budget,
                        store_url=str(store))


def _plant_manifest(store: Path, path: str, ref: str, *,
                    claimed: Digest | None = None) -> None:
    """Write a manifest naming ``path`` straight into the store, past its validation;
    ``claimed``: a file digest other than the one its chunk list makes."""
    data = b"payload"
    d = Digest.of(data)
    own = file_digest([Chunk(d, 0, len(data))])
    bs = BlobStore(str(store))
    bs.backend.put(object_key(d), data)
    doc = {"version": 1, "source": {}, "files": [
        {"path": path, "size": len(data), "mode": 0o644, "digest": str(claimed or own),
         "chunks": [{"digest": str(d), "offset": 0, "length": len(data), "encoding": "raw",
                     "stored_length": len(data)}]}]}
    raw = canonical_json(doc)
    md = Digest.of(raw)
    bs.backend.put(object_key(md), raw)
    bs.backend.put(f"manifests/{md.hex}", b"")
    ns, rest = ref.split("/")
    model, tag = rest.split(":")
    bs.backend.put(f"refs/{ns}/{model}/{tag}", f"{md}\n".encode())


def _node_is_empty_and_consistent(cache: Path) -> None:
    if not cache.exists():
        return
    node = NodeCache(cache, 1 << 30)
    try:
        assert node.recover() == {"orphan_files": 0, "missing_files": 0,
                                  "orphan_partials": 0, "adopted_files": 0}
        stats = node.stats()
        assert stats["files"] == 0 and stats["partial_files"] == 0
        assert node.pinned() == set()
    finally:
        node.close()


@pytest.mark.parametrize("hostile", ["../escape.bin", "/tmp/absolute.bin",
                                     "a/../../escape.bin"])
def test_hostile_manifest_paths_are_refused_before_any_write(
        tmp_path: Path, base: Model, store: Path, hostile: str) -> None:
    _plant_manifest(store, hostile, "evil/model:v1")
    mount = tmp_path / "mounts" / "m"
    with pytest.raises(Exception) as err:
        run_standalone(_options(tmp_path, store), {"ref": "evil/model:v1",
                                                   "mount": str(mount)})
    assert "path" in str(err.value).lower() or "relative" in str(err.value).lower()
    assert not (tmp_path / "mounts").exists(), "nothing was created for the mount"
    assert not (tmp_path / "mounts" / "escape.bin").exists()
    assert not Path("/tmp/absolute.bin").exists()
    _node_is_empty_and_consistent(tmp_path / "node")


def test_planted_symlink_in_the_mount_is_refused_before_any_write(
        tmp_path: Path, base: Model, store: Path) -> None:
    mount = tmp_path / "m"
    outside = tmp_path / "outside"
    (mount).mkdir()
    outside.mkdir()
    os.symlink(outside, mount / "nested")
    with pytest.raises(PullError) as err:
        run_standalone(_options(tmp_path, store), {"ref": base.ref, "mount": str(mount)})
    assert "symlink" in str(err.value)
    assert list(outside.iterdir()) == [], "nothing was written through the symlink"
    assert sorted(p.name for p in mount.iterdir()) == ["nested"]
    _node_is_empty_and_consistent(tmp_path / "node")
    # The mount itself as a symlink is refused too.
    os.symlink(outside, tmp_path / "link-mount")
    with pytest.raises(Exception, match="symlink"):
        run_standalone(_options(tmp_path, store), {"ref": base.ref,
                                                   "mount": str(tmp_path / "link-mount")})
    assert list(outside.iterdir()) == []


def test_budget_smaller_than_the_model_is_a_clear_error(
        tmp_path: Path, base: Model, store: Path) -> None:
    mount = tmp_path / "m"
    with pytest.raises(PullError) as err:
        run_standalone(_options(tmp_path, store, budget=1_000_000),
                       {"ref": base.ref, "mount": str(mount)})
    msg = str(err.value)
    assert "budget of 1,000,000 bytes cannot hold" in msg and "--budget-bytes" in msg
    assert not mount.exists() or not any(mount.rglob("*"))
    _node_is_empty_and_consistent(tmp_path / "node")
    # With room, the same node cache then works.
    run_standalone(_options(tmp_path, store), {"ref": base.ref, "mount": str(mount)})
    assert_mount_matches(base.src, mount)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2.5 MiB tmpfs (root only): smaller than the model, larger than its index."""
    where = tmp_path / "tiny"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(where)],
                          capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): "
                    f"{proc.stderr.decode().strip()}")
    try:
        yield where
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_is_a_clear_error_and_nothing_is_half_published(
        tmp_path: Path, base: Model, store: Path, tiny_disk: Path) -> None:
    cache = tiny_disk / "node"
    mount = tmp_path / "m"
    with pytest.raises(PullError) as err:
        run_standalone(_options(tmp_path, store, cache=cache),
                       {"ref": base.ref, "mount": str(mount)})
    assert "no space on the node's disk" in str(err.value)
    assert not mount.exists() or not any(p.is_file() for p in mount.rglob("*")), (
        "a failed pull publishes nothing in the mount")
    node = NodeCache(cache, 1 << 30)
    try:
        assert node.recover() == {"orphan_files": 0, "missing_files": 0,
                                  "orphan_partials": 0, "adopted_files": 0}, "files and index agree"
        for e in node.entries():
            path = node.partial_path(e.key) if e.partial else node.file_path(e.key)
            assert path.stat().st_size == e.size
        assert node.pinned() == set(), "a failed pull holds no pins"
    finally:
        node.close()
    with open(tiny_disk / "probe.json", "w") as f:
        json.dump({}, f)  # the filesystem is still usable


def test_a_manifest_lying_about_a_file_digest_cannot_poison_the_node_cache(
        tmp_path: Path, base: Model, store: Path) -> None:
    victim = base.manifest.file("config.json")
    _plant_manifest(store, "config.json", "evil/liar:v1", claimed=victim.digest)
    node = tmp_path / "node"
    # A file digest is the hash of the chunk list, so the lie is refused when the
    # manifest is parsed, before anything is written.
    with pytest.raises(PullError, match="does not match its chunk list"):
        run_standalone(_options(tmp_path, store, cache=node),
                       {"ref": "evil/liar:v1", "mount": str(tmp_path / "evil")})
    assert not (tmp_path / "evil").exists() or not any((tmp_path / "evil").rglob("*.json"))
    # The honest model pulled next on the same node gets its own bytes.
    run_standalone(_options(tmp_path, store, cache=node),
                   {"ref": base.ref, "mount": str(tmp_path / "good")})
    assert_mount_matches(base.src, tmp_path / "good")


def test_verify_files_rereads_every_chunk_before_publishing(
        tmp_path: Path, base: Model, store: Path) -> None:
    opts = AgentOptions(cache_dir=tmp_path / "node", budget_bytes=1 << 30,
                        store_url=str(store), verify_files=True)
    run_standalone(opts, {"ref": base.ref, "mount": str(tmp_path / "verified")})
    assert_mount_matches(base.src, tmp_path / "verified")


# -- never touch what bdn did not create -------------------------------------------------

def _user_folder(root: Path) -> None:
    """A folder a user already has: files, a directory the model also needs (nested/),
    an empty directory, each with a mode of its own."""
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    (root / "nested").mkdir()
    (root / "nested" / "keep.txt").write_text("also mine")
    (root / "empty").mkdir()
    os.chmod(root / "empty", 0o700)
    os.chmod(root / "nested", 0o710)
    os.chmod(root, 0o750)


def _snapshot(root: Path, only: Iterable[str] | None = None
              ) -> dict[str, tuple[int, int, bytes]]:
    """Mode, inode and bytes of the folder and everything under it (or of ``only``)."""
    out = {}
    keep = None if only is None else set(only)
    for p in [root, *root.rglob("*")]:
        rel = p.relative_to(root).as_posix()
        if keep is not None and rel not in keep:
            continue
        st = p.lstat()
        out[rel] = (st.st_mode, st.st_ino, p.read_bytes() if p.is_file() else b"")
    return out


def _model_files(model: Model) -> set[str]:
    return {f.path for f in model.manifest.files}


def test_pull_to_a_folder_with_user_files_leaves_them_and_their_modes(
        tmp_path: Path, base: Model, store: Path) -> None:
    folder = tmp_path / "work"
    _user_folder(folder)
    before = _snapshot(folder)
    run_standalone(_options(tmp_path, store), build_request(base.ref, str(folder)))
    for rel in _model_files(base):
        assert (folder / rel).read_bytes() == (base.src / rel).read_bytes(), rel
    assert _snapshot(folder, only=before) == before, (
        "no existing file or directory changed (mode, inode, bytes)")


def test_failed_pull_to_a_folder_with_user_files_leaves_them_and_their_modes(
        tmp_path: Path, base: Model, store: Path) -> None:
    plant_broken_model(store, base, "test/broken:v1")
    folder = tmp_path / "work"
    _user_folder(folder)
    before = _snapshot(folder)
    with pytest.raises(PullError):
        run_standalone(_options(tmp_path, store), build_request("test/broken:v1",
                                                                str(folder)))
    assert _snapshot(folder) == before, "the failure cleanup removed only what bdn made"


def test_release_of_a_pull_into_a_folder_with_user_files_leaves_them(
        tmp_path: Path, base: Model, store: Path, agents: list[Agent]) -> None:
    agent = Agent(tmp_path, store=store)
    agents.append(agent)
    folder = tmp_path / "work"
    _user_folder(folder)
    before = _snapshot(folder)
    started = agent.client.start_pull(ref=base.ref, mount=str(folder))
    agent.client.wait(started["id"])
    assert (folder / "config.json").is_file()
    agent.client.release(started["id"], started["token"])
    assert _snapshot(folder) == before, "release removed only what bdn made"


@pytest.mark.parametrize("same_bytes", [False, True])
def test_a_user_file_where_the_model_needs_one_is_refused_before_any_write(
        tmp_path: Path, base: Model, store: Path, same_bytes: bool) -> None:
    folder = tmp_path / "work"
    _user_folder(folder)
    theirs = folder / "nested" / "config-copy.json"
    theirs.write_bytes((base.src / "config.json").read_bytes() if same_bytes else b"{}")
    before = _snapshot(folder)
    with pytest.raises(PullError) as err:
        run_standalone(_options(tmp_path, store), build_request(base.ref, str(folder)))
    assert str(theirs) in str(err.value) and "not placed by bdn" in str(err.value)
    assert _snapshot(folder) == before
    _node_is_empty_and_consistent(tmp_path / "node")


# The ref names nothing in the store: code that failed to refuse these would stop at
# resolving it, before writing into a system folder.
ABSENT_REF = "test/absent:v1"


@pytest.mark.parametrize("mount", ["/", "/etc/bdn-test-mount", "/usr/local/models/x",
                                   "/proc/bdn-x", "/dev/shm/bdn-x", "/boot", "/lib/bdn-x"])
def test_mounts_at_or_under_system_folders_are_refused(
        tmp_path: Path, store: Path, mount: str) -> None:
    existed = os.path.lexists(mount)
    with pytest.raises(PathError) as err:
        run_standalone(_options(tmp_path, store), {"ref": ABSENT_REF, "mount": mount})
    assert err.value.field == "mount"
    assert os.path.lexists(mount) == existed
    with pytest.raises(PathError) as err:
        parse_request({"weights": [{"source": "hf://org/m@main", "mount_location": "/m"}],
                       "mount_root": mount})
    assert err.value.field == "mount_root"


def test_a_symlink_into_a_system_folder_is_refused(tmp_path: Path, store: Path) -> None:
    os.symlink("/etc", tmp_path / "sneaky")
    with pytest.raises(PathError, match="system folder /etc") as err:
        run_standalone(_options(tmp_path, store),
                       {"ref": ABSENT_REF, "mount": str(tmp_path / "sneaky" / "bdn-x")})
    assert err.value.field == "mount"
    assert not os.path.lexists("/etc/bdn-x")


# -- the agent socket ---------------------------------------------------------------------

def _other_group() -> grp.struct_group:
    """A group other than root's, for --socket-group."""
    if os.geteuid() != 0:
        return grp.getgrgid(os.getgid())
    for g in sorted(grp.getgrall(), key=lambda g: g.gr_gid):
        if g.gr_gid != 0:
            return g
    pytest.skip("no group other than root on this machine")


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_agent_socket_is_0660_whatever_the_umask(
        tmp_path: Path, store: Path, agents: list[Agent], umask: int) -> None:
    group = _other_group()
    agent = Agent(tmp_path, store=store, umask=umask,
                  extra=("--socket-group", group.gr_name))
    agents.append(agent)
    st = os.lstat(agent.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == group.gr_gid
    assert agent.client.healthy()


# A client run as another user: it starts as root (to reach the interpreter), imports
# what it needs, then drops to the given uid/gid before connecting.
AS_USER = r"""
import http.client, json, os, socket, sys
sock_path, uid, gid, method, path, headers, body = sys.argv[1:]
os.setgroups([int(gid)]); os.setgid(int(gid)); os.setuid(int(uid))
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sock_path)
conn = Conn("localhost", timeout=30)
conn.request(method, path, body=body.encode() or None,
             headers={"Content-Type": "application/json", **json.loads(headers)})
resp = conn.getresponse()
print(json.dumps({"status": resp.status, "doc": json.loads(resp.read() or b"null")}))
"""
NOBODY_UID = 65534


def _as_user(sock: str, gid: int, method: str, path: str, *,
             headers: dict[str, str] | None = None, body: Any = None) -> tuple[int, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", AS_USER, sock, str(NOBODY_UID), str(gid), method, path,
         json.dumps(headers or {}), "" if body is None else json.dumps(body)],
        capture_output=True, text=True, check=True, timeout=60)
    out = json.loads(proc.stdout)
    return out["status"], out["doc"]


@pytest.fixture
def shared_socket_dir() -> Iterator[Path]:
    """A folder another user can reach a socket in (pytest's tmp folders are 0700)."""
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    where = Path(tempfile.mkdtemp(prefix="bdn-sock-"))
    os.chmod(where, 0o711)
    try:
        yield where
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_release_needs_the_token_of_the_pull(
        tmp_path: Path, base: Model, store: Path, agents: list[Agent],
        shared_socket_dir: Path) -> None:
    group = _other_group()
    agent = Agent(tmp_path, store=store, socket=str(shared_socket_dir / "a.sock"),
                  extra=("--socket-group", str(group.gr_gid)))
    agents.append(agent)
    mount = tmp_path / "m"
    started = agent.client.start_pull(ref=base.ref, mount=str(mount))
    token = started["token"]
    agent.client.wait(started["id"])
    path = f"/v1/pulls/{started['id']}"
    # Another model's process, without the token or with a wrong one: refused.
    for headers in ({}, {"X-Bdn-Pull-Token": "0" * 64}, {"X-Bdn-Pull-Token": token[:-1]}):
        status, doc = _as_user(agent.socket, group.gr_gid, "DELETE", path, headers=headers)
        assert status == 403 and "token" in doc["error"], (headers, doc)
    assert_mount_matches(base.src, mount)
    assert agent.client.status(started["id"])["state"] == "done"
    # With the token: released.
    status, doc = _as_user(agent.socket, group.gr_gid, "DELETE", path,
                           headers={"X-Bdn-Pull-Token": token})
    assert status == 200 and doc["state"] == "released"
    assert not mount.exists()
    # Root may release without a token.
    other = agent.client.start_pull(ref=base.ref, mount=str(mount))
    agent.client.wait(other["id"])
    released = AgentClient(agent.socket).release(other["id"])  # a client without it
    assert released["state"] == "released"
    # The client keeps the token of each pull it started, for its own release().
    assert agent.client._tokens[other["id"]] == other["token"]


def test_a_reposted_pull_returns_its_token_to_the_same_caller_only(
        tmp_path: Path, base: Model, store: Path, agents: list[Agent],
        shared_socket_dir: Path) -> None:
    group = _other_group()
    agent = Agent(tmp_path, store=store, socket=str(shared_socket_dir / "a.sock"),
                  extra=("--socket-group", str(group.gr_gid)))
    agents.append(agent)
    body = {"ref": base.ref, "mount": str(tmp_path / "m")}
    key = {"Idempotency-Key": "deploy-1"}
    # Created by another user: that user gets the token back on a re-post; root may too.
    status, first = _as_user(agent.socket, group.gr_gid, "POST", "/v1/pulls",
                             headers=key, body=body)
    assert status == 202 and first["created"] and first["token"]
    status, again = _as_user(agent.socket, group.gr_gid, "POST", "/v1/pulls",
                             headers=key, body=body)
    assert status == 200 and again["id"] == first["id"] and again["token"] == first["token"]
    by_root = agent.client.start_pull(**body, idempotency_key="deploy-1")
    assert by_root["token"] == first["token"]
    # Created by root: another user re-posting the (guessable) key gets no token, and
    # cannot release the pull.
    mine = agent.client.start_pull(ref=base.ref, mount=str(tmp_path / "r"),
                                   idempotency_key="deploy-2")
    agent.client.wait(mine["id"])
    status, theirs = _as_user(agent.socket, group.gr_gid, "POST", "/v1/pulls",
                              headers={"Idempotency-Key": "deploy-2"},
                              body={"ref": base.ref, "mount": str(tmp_path / "r")})
    assert status == 200 and theirs["id"] == mine["id"] and "token" not in theirs
    status, _ = _as_user(agent.socket, group.gr_gid, "DELETE", f"/v1/pulls/{mine['id']}")
    assert status == 403
    assert_mount_matches(base.src, tmp_path / "r")
