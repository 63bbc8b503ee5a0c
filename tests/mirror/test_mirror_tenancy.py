"""Tenants of one mirror service cannot reach each other or the service's host.

Each test runs a real ``bdn mirror-server`` process against loopback fixtures:

* a job may not read the host's files unless the operator allowed the folder
  (``--allow-local-root``), and neither ``..`` nor a symlink escapes an allowed folder;
* a job may only use its own namespace's secrets, and a refused secret never reaches the
  upstream (the Hub fixture records every ``Authorization`` header it saw);
* hostile ``allow_patterns`` / ``ignore_patterns`` are refused at submission, and a
  pattern that would make a backtracking regex explode neither stalls the job nor the
  event loop (``/healthz`` keeps answering);
* secret values stay out of the logs at any verbosity, tracebacks included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bdn.store import BlobStore
from manifests.refs import Ref
from tests.mirror.test_mirror_service import (
    KEY_OTHER,
    KEY_TEAM,
    WAIT_S,
    Server,
    _raw,
)
from tests.support.procs import bdn_command, free_port

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

OTHER_TOKEN = "hf_OtherTenantToken0123456789"
OPERATOR_TOKEN = "hf_OperatorOnlyToken0123456789"
HEALTH_TIMEOUT_S = 5.0


@pytest.fixture
def server(tmp_path: Path, hub: Any) -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(*extra: str, verbose: tuple[str, ...] = ()) -> Server:
        s = Server(tmp_path / f"svc{len(made)}", hub.url)
        s.start(extra=extra, verbose=verbose)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def _files(store_dir: Path, ref: str) -> list[str]:
    store = BlobStore(str(store_dir))
    return sorted(f.path for f in store.get_manifest(store.get_ref(Ref.parse(ref))).files)


def _final(s: Server, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        status, doc = _raw(f"{s.url}/v1/mirrors/{job_id}", key=KEY_TEAM)
        assert status == 200, doc
        if doc["job"]["state"] in ("succeeded", "failed", "cancelled"):
            return dict(doc["job"])
        assert time.monotonic() < deadline, f"job {job_id} did not finish"
        time.sleep(0.05)


# -- 1: local sources ------------------------------------------------------------------


def test_api_local_sources_need_an_allowed_root(server: Callable[..., Server],
                                                tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    model = allowed / "model"
    outside = tmp_path / "outside"
    (model / "sub").mkdir(parents=True)
    outside.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "sub" / "w.bin").write_bytes(os.urandom(4096))
    (outside / "host-secret.txt").write_text("root:x:0:0\n")
    # Links that point out of the allowed folder: a file link inside the model, and a
    # directory link that names the outside folder through the allowed one.
    (model / "leak.txt").symlink_to(outside / "host-secret.txt")
    (allowed / "escape").symlink_to(outside, target_is_directory=True)

    closed = server()  # no --allow-local-root: no local source at all
    status, doc = _raw(f"{closed.url}/v1/mirrors", "POST", KEY_TEAM,
                       {"weights": {"source": f"file://{model}"}, "ref": "team/local:v1"})
    assert status == 403 and "--allow-local-root" in doc["error"], doc

    s = server("--allow-local-root", str(allowed))
    for source, expected in ((f"file://{outside}", 403), (f"file://{allowed}/escape", 403),
                             ("file:///etc", 403), (f"file://{allowed}/../outside", 400)):
        status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_TEAM,
                           {"weights": {"source": source}, "ref": "team/local:v1"})
        assert status == expected, (source, status, doc)
    status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_TEAM,
                       {"weights": {"source": f"file://{model}"}, "ref": "team/local:v1"})
    assert status == 202, doc
    done = _final(s, doc["job"]["id"])
    assert done["state"] == "succeeded", done
    # The link to a file outside the allowed root was not followed.
    assert _files(s.store_dir, "team/local:v1") == ["config.json", "sub/w.bin"]

    # The CLI's own local mirror (the operator at a shell) is not restricted.
    out = subprocess.run(bdn_command("mirror", str(outside), "--ref", "team/cli:v1",
                                     "--store", str(tmp_path / "cli-store"), "--json"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# -- 2: secrets per namespace ----------------------------------------------------------


def test_secrets_are_scoped_to_the_job_namespace(server: Callable[..., Server], hub: Any,
                                                 make_files: Any) -> None:
    hub.state.commit("org/theirs", make_files(61), token=OTHER_TOKEN)
    s = server()
    (s.secrets / "other").mkdir()
    (s.secrets / "other" / "hf_other").write_text(OTHER_TOKEN)
    (s.secrets / "hf_operator").write_text(OPERATOR_TOKEN)  # top level: the operator's
    body = {"weights": {"source": "hf://org/theirs", "auth_secret_name": "other/hf_other"},
            "ref": "team/theirs:v1"}
    status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_TEAM, body)
    assert status == 403 and "namespace 'other'" in doc["error"], doc
    assert _raw(f"{s.url}/v1/mirrors", key=KEY_TEAM)[1]["jobs"] == []  # no job was made
    # Unprefixed names resolve in the job's own namespace only: neither the other
    # tenant's folder nor the operator's top-level secrets are reachable.
    for name in ("hf_other", "hf_operator"):
        body = {"weights": {"source": "hf://org/theirs", "auth_secret_name": name},
                "ref": "team/theirs:v1"}
        status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_TEAM, body)
        assert status == 202, doc
        done = _final(s, doc["job"]["id"])
        assert done["state"] == "failed" and f"secret {name!r} not found" in done["error"]
    seen = list(hub.state.auth_headers_seen)
    assert not any(OTHER_TOKEN in h or OPERATOR_TOKEN in h for h in seen), seen
    # The owner uses its secret, by bare name or with its own namespace prefix.
    for i, name in enumerate(("hf_other", "other/hf_other")):
        body = {"weights": {"source": "hf://org/theirs", "auth_secret_name": name},
                "ref": f"other/theirs:v{i}"}
        status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_OTHER, body)
        assert status == 202, doc
        job_id = doc["job"]["id"]
        deadline = time.monotonic() + WAIT_S
        while (job := _raw(f"{s.url}/v1/mirrors/{job_id}", key=KEY_OTHER)[1]["job"]
               )["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert job["state"] == "succeeded", job
    assert any(OTHER_TOKEN in h for h in hub.state.auth_headers_seen)


def test_bucket_sources_need_the_tenants_own_credentials(
        server: Callable[..., Server]) -> None:
    """An S3/GCS source with no secret (or a pod-identity auth method) would be read
    with the service's own credentials, which can read the operator's buckets: refused
    with a 403 naming the field unless the operator allows it (fails on main before
    this change: such jobs were accepted and ran as the service)."""
    s = server()
    ambient = [{"source": "s3://operator-bucket/model"},
               {"source": "r2://acct.operator-bucket/model"},
               {"source": "gs://operator-bucket/model"},
               {"source": "s3://operator-bucket/model",
                "auth": {"auth_method": "AWS_OIDC",
                         "aws_oidc_role_arn": "arn:aws:iam::123456789012:role/r",
                         "aws_oidc_region": "us-east-1"}},
               {"source": "gs://operator-bucket/model",
                "auth": {"auth_method": "GCP_OIDC",
                         "gcp_oidc_service_account": "sa@p.iam.gserviceaccount.com",
                         "gcp_oidc_workload_id_provider": "projects/1/locations/global/"
                                                          "workloadIdentityPools/p/providers/q"}}]
    for weights in ambient:
        status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_TEAM,
                           {"weights": weights, "ref": "team/bucket:v1"})
        assert status == 403, (weights, status, doc)
        assert "auth_secret_name" in doc["error"], doc
        assert "--allow-ambient-credentials" in doc["error"], doc
    assert _raw(f"{s.url}/v1/mirrors", key=KEY_TEAM)[1]["jobs"] == []  # no job was made
    # With the tenant's own secret the job is accepted (it runs, and fails to connect).
    status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_TEAM,
                       {"weights": {"source": "s3://operator-bucket/model",
                                    "auth_secret_name": "hf"}, "ref": "team/bucket:v1"})
    assert status == 202, doc
    # The operator may allow the service's own credentials (a single-tenant service).
    s.stop()
    s2 = server("--allow-ambient-credentials")
    for weights in ambient:
        status, doc = _raw(f"{s2.url}/v1/mirrors", "POST", KEY_TEAM,
                           {"weights": weights, "ref": "team/bucket:v1"})
        assert status == 202, (weights, status, doc)


# -- 3: patterns -----------------------------------------------------------------------


@pytest.mark.parametrize(("field", "pattern"), [
    ("allow_patterns", "[z-a]"),
    ("ignore_patterns", "[!]"),
    ("allow_patterns", "a" * 10_000),
])
def test_bad_patterns_are_refused_at_submission(server: Callable[..., Server],
                                                field: str, pattern: str) -> None:
    s = server()
    body = {"weights": {"source": "hf://org/any", field: ["*.json", pattern]},
            "ref": "team/pat:v1"}
    status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_TEAM, body)
    assert status == 400, doc
    assert field in doc["error"] and len(doc["error"]) < 400, doc


def test_hostile_pattern_does_not_stall_the_service(server: Callable[..., Server],
                                                    hub: Any) -> None:
    deep = "/".join(["d"] * 40) + "/w.bin"
    hub.state.commit("org/deep", {deep: b"x" * 100, "config.json": b"{}"})
    s = server()
    # As a backtracking regex, each "**/" is a nested (?:[^/]*/)*: 300 of them against a
    # 40-directory path never finish, and re holds the GIL while it tries.
    hostile = "**/" * 300 + "nomatch"
    body = {"weights": {"source": "hf://org/deep", "ignore_patterns": [hostile],
                        "allow_patterns": ["**/*.bin", "*.json"]}, "ref": "team/deep:v1"}
    status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_TEAM, body)
    assert status == 202, doc
    job_id = doc["job"]["id"]
    deadline = time.monotonic() + WAIT_S
    while True:
        # The service answers /healthz promptly for the whole life of the job.
        with urllib.request.urlopen(f"{s.url}/healthz", timeout=HEALTH_TIMEOUT_S) as r:
            assert r.status == 200
        status, doc = _raw(f"{s.url}/v1/mirrors/{job_id}", key=KEY_TEAM)
        if doc["job"]["state"] in ("succeeded", "failed"):
            break
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.05)
    assert doc["job"]["state"] == "succeeded", doc
    assert _files(s.store_dir, "team/deep:v1") == ["config.json", deep]


# -- 4: secrets out of logs ------------------------------------------------------------


TENANT_KEY_ID = "AKIATENANTKEYID00001"
TENANT_SECRET = "tenant-secret-access-key-0123456789"


def _tenant_creds(endpoint: str) -> str:
    return json.dumps({"aws_access_key_id": TENANT_KEY_ID,
                       "aws_secret_access_key": TENANT_SECRET, "aws_region": "us-east-1",
                       "endpoint_url": endpoint})


def test_tracebacks_are_scrubbed_in_the_mirror_server(server: Callable[..., Server]) -> None:
    # botocore's EndpointConnectionError quotes the endpoint URL, and at -vv botocore logs
    # it with its traceback; this endpoint carries the access key id in its path.
    dead = f"http://127.0.0.1:{free_port()}/{TENANT_KEY_ID}"
    s = server(verbose=("-vv",))
    # In the team's folder, and at the top level, where tenants' secrets lived before
    # they were scoped by namespace (so this test exercises the same path there).
    for folder in (s.secrets / "team", s.secrets):
        (folder / "s3creds").write_text(_tenant_creds(dead))
    body = {"weights": {"source": "s3://bucket/model", "auth_secret_name": "s3creds"},
            "ref": "team/s3:v1"}
    status, doc = _raw(f"{s.url}/v1/mirrors", "POST", KEY_TEAM, body)
    assert status == 202, doc
    done = _final(s, doc["job"]["id"])
    assert done["state"] == "failed"
    s.stop()
    out = s.all_output()
    assert "Traceback" in out and "EndpointConnectionError" in out  # the path ran
    assert TENANT_KEY_ID not in out and TENANT_SECRET not in out


def test_cli_logs_are_scrubbed_at_any_verbosity(tmp_path: Path, s3_server: Any) -> None:
    bucket = s3_server.bucket("scrub")
    s3_server.upload(bucket, "m", {"config.json": b"{}"})
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "s3creds").write_text(_tenant_creds(s3_server.url))
    for verbose in ("-v", "-vv"):
        out = subprocess.run(bdn_command(verbose, "mirror", f"s3://{bucket}/m",
                                         "--secret", "s3creds", "--secrets-dir", str(secrets),
                                         "--ref", "team/scrub:v1",
                                         "--store", str(tmp_path / "store"), "--json"),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        text = out.stdout + out.stderr
        assert TENANT_KEY_ID not in text and TENANT_SECRET not in text, verbose


def test_uncaught_tracebacks_are_scrubbed_in_any_thread() -> None:
    # What Python prints itself, outside logging: an exception nobody caught, in the
    # main thread and in a worker thread, after the entry point installed the scrubber.
    script = (
        "import threading\n"
        "from bdn.secrets import SecretResolver, install_log_scrubber\n"
        "install_log_scrubber()\n"
        f"SecretResolver(env={{'BDN_SECRET_K': {TENANT_SECRET!r}}}).get('k')\n"
        "def boom():\n"
        f"    raise RuntimeError('worker saw ' + {TENANT_SECRET!r})\n"
        "t = threading.Thread(target=boom, name='w')\n"
        "t.start(); t.join()\n"
        f"raise RuntimeError('main saw ' + {TENANT_SECRET!r})\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    assert "worker saw ***" in out.stderr and "main saw ***" in out.stderr, out.stderr
    assert TENANT_SECRET not in out.stderr
