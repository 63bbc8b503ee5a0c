"""The mirror service as a real process: API keys, jobs, idempotency, limits, cancel,
restart with resume, secrets kept out of every output, and ``bdn mirror --server``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from bdn.config import parse_weights
from bdn.errors import AuthError, MirrorError
from bdn.metrics import parse_metrics
from bdn.mirror_client import MirrorClient, MirrorServiceError
from bdn.mirror_key import mirror_ref
from bdn.mirror_service import hash_key
from bdn.store import BlobStore, StoreOptions
from manifests.refs import Ref
from tests.support.procs import ServiceProcess, bdn_command

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

KEY_TEAM = "bdn_test_key_team_0123456789abcdef"
KEY_OTHER = "bdn_test_key_other_0123456789abcdef"
HF_TOKEN = "hf_ServiceSecretToken0123456789"
POLL_S = 0.05
WAIT_S = 60.0


class Server:
    def __init__(self, root: Path, hub_url: str) -> None:
        self.root = root
        self.hub_url = hub_url
        self.store_dir = root / "store"
        self.state_dir = root / "state"
        self.keys = root / "keys.yaml"
        self.secrets = root / "secrets"
        self.secrets.mkdir(parents=True, exist_ok=True)
        # Secrets are per namespace: a job sees only its own namespace's folder.
        for ns in ("team", "mirrors"):
            (self.secrets / ns).mkdir(exist_ok=True)
            (self.secrets / ns / "hf").write_text(HF_TOKEN + "\n")
            (self.secrets / ns / "hf_wrong").write_text("hf_WrongServiceToken9876543210\n")
        self.keys.write_text(
            "keys:\n"
            f"  - name: team\n    sha256: {hash_key(KEY_TEAM)}\n"
            "    namespaces: [team, mirrors]\n"
            f"  - name: other\n    sha256: {hash_key(KEY_OTHER)}\n    namespaces: [other]\n")
        self.proc: ServiceProcess | None = None
        self.outputs: list[str] = []

    def start(self, max_jobs: int = 2, store: list[str] | None = None,
              extra: Sequence[str] = (), verbose: Sequence[str] = ()) -> ServiceProcess:
        store_args = store or ["--store", str(self.store_dir)]
        self.proc = ServiceProcess(bdn_command(
            *verbose, "mirror-server", "--listen", "127.0.0.1:0", *store_args, *extra,
            "--state-dir", str(self.state_dir), "--keys", str(self.keys),
            "--secrets-dir", str(self.secrets), "--hf-endpoint", self.hub_url,
            "--max-jobs", str(max_jobs), "--job-concurrency", "2", "--part-mib", "1"))
        return self.proc

    @property
    def url(self) -> str:
        assert self.proc is not None and self.proc.url
        return self.proc.url

    def client(self, key: str = KEY_TEAM) -> MirrorClient:
        return MirrorClient(self.url, key)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.outputs.append(self.proc.output)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill9()
        self.outputs.append(self.proc.output)

    def all_output(self) -> str:
        live = self.proc.output if self.proc is not None else ""
        return "\n".join([*self.outputs, live])


@pytest.fixture
def server(tmp_path: Path, hub: Any) -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(max_jobs: int = 2, store: list[str] | None = None) -> Server:
        s = Server(tmp_path / "svc", hub.url)
        s.start(max_jobs, store)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def _raw(url: str, method: str = "GET", key: str | None = None, body: Any = None
         ) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Api-Key {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _wait_for(pred: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL_S)


def _weights(source: str, **kw: Any) -> dict[str, Any]:
    return {"source": source, **kw}


def test_mirror_service_api_keys(server: Callable[..., Server], hub: Any,
                                 make_files: Any) -> None:
    hub.state.commit("org/keys", make_files(11))
    s = server()
    body = {"weights": _weights("hf://org/keys"), "ref": "team/keys:v1"}
    assert _raw(f"{s.url}/v1/mirrors", "POST", None, body)[0] == 401
    assert _raw(f"{s.url}/v1/mirrors", "POST", "bdn_not_a_key", body)[0] == 401
    status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_OTHER, body)
    assert status == 403 and "namespace 'team'" in doc["error"]
    assert _raw(f"{s.url}/healthz")[0] == 200
    job = s.client().submit(body["weights"], "team/keys:v1")
    assert _raw(f"{s.url}/v1/mirrors/{job['id']}", key=KEY_OTHER)[0] == 403
    assert _raw(f"{s.url}/v1/refs/team/keys/v1", key=KEY_OTHER)[0] == 403
    assert s.client(KEY_OTHER).list() == []
    done = s.client().wait(job["id"], timeout_s=WAIT_S)
    assert _raw(f"{s.url}/v1/manifests/{done['manifest']}", key=KEY_OTHER)[0] == 404
    with pytest.raises(AuthError) as info:
        s.client(KEY_OTHER).cancel(job["id"])
    assert info.value.status == 403  # type: ignore[attr-defined]
    status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_TEAM,
                       {"weights": _weights("ftp://x/y"), "ref": "team/x:v1"})
    assert status == 400 and "unsupported scheme 'ftp://'" in doc["error"]


def test_mirror_service_job_lifecycle_and_secrets(server: Callable[..., Server], hub: Any,
                                                  make_files: Any) -> None:
    files = make_files(12)
    sha = hub.state.commit("org/svc", files, token=HF_TOKEN)
    s = server()
    c = s.client()
    weights = _weights("hf://org/svc@main", auth_secret_name="hf")
    job = c.submit(weights, "team/svc:v1", idempotency_key="once")
    assert job["state"] in ("queued", "running")
    # The same request again is the same job; another request under the key is refused.
    assert c.submit(weights, "team/svc:v1", idempotency_key="once")["id"] == job["id"]
    with pytest.raises(MirrorServiceError) as info:
        c.submit(_weights("hf://org/svc@main"), "team/svc:v1", idempotency_key="once")
    assert info.value.status == 409
    done = c.wait(job["id"], timeout_s=WAIT_S)
    total = sum(len(d) for d in files.values())
    st = done["stats"]
    assert st["files"] == len(files) and st["bytes_from_origin"] == total
    assert st["bytes_reused"] == 0 and st["throughput_bytes_per_s"] > 0
    assert done["source_pin"]["commit"] == sha and done["attempts"] == 1
    assert done["progress"]["files_done"] == len(files) and done["error"] is None
    store = BlobStore(str(s.store_dir))
    digest = store.get_ref(Ref.parse("team/svc:v1"))
    assert str(digest) == done["manifest"] == c.ref("team/svc:v1")
    assert c.manifest(done["manifest"]) == store.get_manifest_bytes(digest)
    # Without a ref, the job lands where the node agent will look: mirror_ref(entry).
    again = c.wait(c.submit(weights)["id"], timeout_s=WAIT_S)
    expected = mirror_ref(parse_weights([{**weights, "mount_location": "/w"}])[0])
    assert again["ref"] == str(expected) and store.get_ref(expected) == digest
    assert again["stats"]["bytes_from_origin"] == 0  # every file known by fingerprint
    # Failures carry clear errors: a missing secret, and credentials the Hub refuses.
    bad = c.submit(_weights("hf://org/svc", auth_secret_name="nope"), "team/svc:bad")
    with pytest.raises(MirrorError, match=r"secret 'nope' not found"):
        c.wait(bad["id"], timeout_s=WAIT_S)
    wrong = c.submit(_weights("hf://org/svc", auth_secret_name="hf_wrong"), "team/svc:wrong")
    with pytest.raises(MirrorError, match="refused the credentials"):
        c.wait(wrong["id"], timeout_s=WAIT_S)
    listed = {j["id"]: j["state"] for j in c.list()}
    assert listed[job["id"]] == "succeeded" and listed[wrong["id"]] == "failed"
    # /metrics (no key needed) counts the jobs by how they ended and the bytes moved.
    with urllib.request.urlopen(f"{s.url}/metrics", timeout=10) as r:
        m = parse_metrics(r.read().decode())
    assert m['bdn_mirror_jobs_ended_total{state="succeeded"}'] == 2
    assert m['bdn_mirror_jobs_ended_total{state="failed"}'] == 2
    assert m['bdn_mirror_jobs_ended_total{state="cancelled"}'] == 0
    assert m["bdn_mirror_origin_bytes_total"] == total
    assert m["bdn_mirror_bytes_total"] >= total
    assert m["bdn_mirror_jobs_running"] == 0 and m["bdn_mirror_jobs_queued"] == 0
    s.stop()
    # No secret in the service's output, the job records (LMDB) or the manifest.
    leaks = [HF_TOKEN, "hf_WrongServiceToken9876543210"]
    lmdb_bytes = b"".join(p.read_bytes() for p in (s.state_dir / "jobs.lmdb").iterdir())
    for secret in leaks:
        assert secret not in s.all_output()
        assert secret.encode() not in lmdb_bytes
        assert secret.encode() not in store.get_manifest_bytes(digest)
    assert b"org/svc" in lmdb_bytes  # the records are there, just without secrets


def test_mirror_service_limits_and_cancel(server: Callable[..., Server], hub: Any,
                                          make_files: Any) -> None:
    stuck_files = make_files(21)
    hub.state.commit("org/stuck", stuck_files)
    hub.state.commit("org/next", make_files(22))
    hub.state.faults.stall_blobs.add(hashlib.sha256(stuck_files["config.json"]).hexdigest())
    s = server(max_jobs=1)
    c = s.client()
    first = c.submit(_weights("hf://org/stuck"), "team/stuck:v1")
    _wait_for(lambda: c.get(first["id"])["state"] == "running" and
              hub.state.download_requests >= 1, "the first job to be stuck in backoff")
    second = c.submit(_weights("hf://org/next"), "team/next:v1")
    assert c.get(second["id"])["state"] == "queued"  # global limit: one job at a time
    cancelled = c.cancel(first["id"])
    assert cancelled["id"] == first["id"]
    # The cancel wakes the 30 s Retry-After wait at once; the queued job then runs.
    _wait_for(lambda: c.get(first["id"])["state"] == "cancelled", "cancel", timeout_s=10)
    assert c.get(first["id"])["error"] == "cancelled by request"
    done = c.wait(second["id"], timeout_s=WAIT_S)
    assert done["state"] == "succeeded"
    # Cancelling a finished job changes nothing.
    assert c.cancel(second["id"])["state"] == "succeeded"


def test_mirror_service_resumes_interrupted_job_after_restart(
        server: Callable[..., Server], hub: Any, make_files: Any) -> None:
    files = make_files(31)
    hub.state.commit("org/restart", files)
    stall = hashlib.sha256(files["sub/dir/tokenizer.bin"]).hexdigest()
    hub.state.faults.stall_blobs.add(stall)
    s = server()
    c = s.client()
    job = c.submit(_weights("hf://org/restart"), "team/restart:v1")
    # Files go in path order; the stalled one is last, so the others are already done.
    _wait_for(lambda: (c.get(job["id"]).get("progress") or {}).get("files_done", 0) >= 3,
              "the first files to land")
    s.kill9()
    hub.state.faults.stall_blobs.clear()
    s.start()
    done = s.client().wait(job["id"], timeout_s=WAIT_S)
    assert done["attempts"] == 2 and done["resumed"] is True
    served = hub.state.stats()["bytes_by_blob"]
    # Files finished before the crash were not fetched again after the restart.
    big = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert served[big] == len(files["model.safetensors"])
    assert done["stats"]["files_reused"] == 3
    store = BlobStore(str(s.store_dir))
    assert str(store.get_ref(Ref.parse("team/restart:v1"))) == done["manifest"]


def test_mirror_cli_through_server_and_in_process(server: Callable[..., Server], hub: Any,
                                                  make_files: Any, tmp_path: Path) -> None:
    files = make_files(41)
    hub.state.commit("org/cli", files)
    s = server()
    env = {"BDN_MIRROR_API_KEY": KEY_TEAM}
    out = subprocess.run(bdn_command("mirror", "hf://org/cli", "--ref", "team/cli:v1",
                                     "--server", s.url, "--json"),
                         capture_output=True, text=True, timeout=120,
                         env={**_env(), **env})
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["ref"] == "team/cli:v1" and doc["files"] == len(files)
    # Without --server the CLI mirrors in this process, into its own store.
    local = tmp_path / "local-store"
    out = subprocess.run(bdn_command("mirror", "hf://org/cli", "--ref", "team/cli:v1",
                                     "--endpoint-url", hub.url, "--store", str(local),
                                     "--json"),
                         capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["manifest"] == doc["manifest"]  # same bytes, same digest
    out = subprocess.run(bdn_command("mirror", "hf://org/cli", "--ref", "team/cli:v1",
                                     "--server", s.url), capture_output=True, text=True,
                         timeout=120, env={**_env(), "BDN_MIRROR_API_KEY": KEY_OTHER})
    assert out.returncode == 1 and "may not write namespace 'team'" in out.stderr


def test_mirror_service_into_s3_store(server: Callable[..., Server], hub: Any,
                                      make_files: Any, s3_server: Any,
                                      tmp_path: Path) -> None:
    files = make_files(51)
    hub.state.commit("org/tos3", files)
    bucket = s3_server.bucket("svcstore")
    store_secret = "StoreSecretValue0123456789"
    secrets = tmp_path / "svc" / "secrets"  # the folder the server fixture uses
    secrets.mkdir(parents=True)
    (secrets / "storecreds").write_text(json.dumps({
        "aws_access_key_id": "AKIASTORE0000000001", "aws_secret_access_key": store_secret,
        "aws_region": "us-east-1"}))
    s = server(store=["--store", f"s3://{bucket}/bdn", "--store-endpoint-url",
                      s3_server.url, "--store-secret", "storecreds"])
    c = s.client()
    done = c.wait(c.submit(_weights("hf://org/tos3"), "team/tos3:v1")["id"], timeout_s=WAIT_S)
    store = BlobStore(f"s3://{bucket}/bdn",
                      StoreOptions(storage_options=s3_server.storage_options()))
    digest = store.get_ref(Ref.parse("team/tos3:v1"))
    assert str(digest) == done["manifest"]
    assert store.get_manifest(digest).total_size == sum(len(d) for d in files.values())
    s.stop()
    assert store_secret not in s.all_output()


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
