"""S3 / R2 / GCS specifics: credentials from secrets (refused keys give a clear error
without the secret), fingerprint reuse across prefixes of a bucket, missing objects."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bdn.config import Auth
from bdn.errors import AuthError, SourceError
from bdn.mirror import Mirror, MirrorOptions
from bdn.retry import RetryPolicy
from bdn.secrets import SecretResolver
from bdn.sources import open_source
from bdn.store import BlobStore
from bdn.transfer.options import DownloadOptions
from manifests.refs import Ref
from tests.support.procs import ServiceProcess, free_port, wait_http

# Real service processes (or servers in-process): left out of `make test-fast`.
pytestmark = pytest.mark.slow

DL = DownloadOptions(part_bytes=64 * 1024, concurrency=4,
                     retry=RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05))
IAM_POLICY = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})


@pytest.fixture
def authed_s3() -> Iterator[tuple[str, dict[str, str]]]:
    """A moto server that checks credentials: IAM user + key made in the first (free)
    actions, every later request must be signed by that key."""
    import boto3

    port = free_port()
    proc = ServiceProcess([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                           str(port)], ready_prefix=None,
                          env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/moto-api/", proc=proc)
        kw = {"endpoint_url": url, "region_name": "us-east-1",
              "aws_access_key_id": "AKIAUNUSED0000000000",
              "aws_secret_access_key": "unused-secret-value"}
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="mirror")
        iam.put_user_policy(UserName="mirror", PolicyName="all", PolicyDocument=IAM_POLICY)
        key = iam.create_access_key(UserName="mirror")["AccessKey"]
        creds = {"aws_access_key_id": key["AccessKeyId"],
                 "aws_secret_access_key": key["SecretAccessKey"], "aws_region": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id=creds["aws_access_key_id"],
                          aws_secret_access_key=creds["aws_secret_access_key"])
        s3.create_bucket(Bucket="private")
        s3.put_object(Bucket="private", Key="m/weights.bin", Body=b"w" * 200_000)
        yield url, creds
    finally:
        proc.stop()


def test_mirror_s3_credentials_from_secret(authed_s3: tuple[str, dict[str, str]],
                                           tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    url, creds = authed_s3
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "good").write_text(json.dumps(creds))
    wrong = dict(creds, aws_secret_access_key="WrongSecretValue0123456789abcdef")
    (secrets / "bad").write_text(json.dumps(wrong))
    store = BlobStore(str(tmp_path / "store"))
    resolver = SecretResolver(str(secrets))
    bad = open_source("s3://private/m", s3_endpoint_url=url, secrets=resolver, download=DL,
                      auth=Auth("CUSTOM_SECRET", auth_secret_name="bad"))
    with pytest.raises(AuthError) as info:
        Mirror(store).run(bad, ref=Ref.parse("team/s3:v1"))
    msg = str(info.value)
    assert "s3://private/m" in msg and "check the credentials secret" in msg
    assert "signature we calculated does not match" in msg
    assert wrong["aws_secret_access_key"] not in msg
    assert wrong["aws_secret_access_key"] not in caplog.text
    good = open_source("s3://private/m", s3_endpoint_url=url, secrets=resolver, download=DL,
                       auth=Auth("CUSTOM_SECRET", auth_secret_name="good"))
    r = Mirror(store, MirrorOptions(spool_dir=str(tmp_path / "spool"))).run(
        good, ref=Ref.parse("team/s3:v1"))
    assert r.stats.bytes_from_origin == 200_000
    assert creds["aws_secret_access_key"].encode() not in store.get_manifest_bytes(
        r.manifest_digest)


def test_mirror_bucket_prefixes_share_by_fingerprint(s3_server: Any, gcs_server: Any,
                                                     tmp_path: Path) -> None:
    blob = bytes(range(256)) * 800
    for scheme, srv, opt in (("s3", s3_server, "s3_endpoint_url"),
                             ("gs", gcs_server, "gcs_endpoint_url")):
        bucket = srv.bucket("share")
        srv.upload(bucket, "a", {"w.bin": blob, "cfg.json": b"{}"})
        srv.upload(bucket, "b", {"w.bin": blob, "other.bin": b"o" * 1000})
        store = BlobStore(str(tmp_path / f"store-{scheme}"))
        m = Mirror(store, MirrorOptions(spool_dir=str(tmp_path / "spool")))
        first = m.run(open_source(f"{scheme}://{bucket}/a", **{opt: srv.url}, download=DL))
        second = m.run(open_source(f"{scheme}://{bucket}/b", **{opt: srv.url}, download=DL))
        assert first.stats.bytes_from_origin == len(blob) + 2
        assert second.stats.bytes_from_origin == 1000, scheme  # w.bin known by fingerprint
        assert second.stats.files_reused == 1


def test_mirror_r2_uri_and_missing_object(s3_server: Any, tmp_path: Path) -> None:
    bucket = s3_server.bucket("r2")
    s3_server.upload(bucket, "p", {"x.bin": b"x" * 70_000})
    src = open_source(f"r2://acct123.{bucket}/p", s3_endpoint_url=s3_server.url, download=DL)
    assert src.pin()["bucket"] == bucket
    files = src.list_files()
    assert [f.path for f in files] == ["x.bin"]
    assert src.read_range(files[0], 10, 20) == b"x" * 10
    # The object disappears between listing and download: the error names source and file.
    s3_server.client().delete_object(Bucket=bucket, Key="p/x.bin")
    with pytest.raises(SourceError) as info:
        Mirror(BlobStore(str(tmp_path / "store")),
               MirrorOptions(spool_dir=str(tmp_path / "spool"))).run(src)
    assert info.value.file == "x.bin" and f"r2://acct123.{bucket}/p" in str(info.value)
    with pytest.raises(SourceError, match=r"r2://<account_id>\.<bucket>/<path>"):
        open_source("r2://nodot/p")
