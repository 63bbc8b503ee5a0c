"""S3 and S3-compatible buckets (``s3://bucket/prefix``, ``r2://account.bucket/prefix``)
as a source, through ``s3fs``.

Listing is one paginated ``ListObjectsV2`` under the prefix; each object's fingerprint is
``s3-etag:<endpoint host>/<bucket>:<etag>:<size>``. The ETag is an MD5 (or an MD5 of part
MD5s for multipart uploads), which is not collision resistant against someone crafting
objects, so the fingerprint is scoped to the bucket: reuse across prefixes and models in
one bucket, never across buckets whose writers we do not know.

Bytes come by parallel ranged ``GetObject`` calls, one per part, each body read as a
stream (``bdn.transfer.fetchers.loop_stream_fetcher``), so a dropped connection is resumed
from the first block not received. botocore's and
s3fs's own retries are turned off so the one bdn policy (backoff, jitter, Retry-After)
applies, with strict connect/read timeouts. Downloads are verified against the object's
full-object CRC32C/CRC32 when S3 has one (``HeadObject`` with ``ChecksumMode``; far
cheaper than MD5), else a single-part ETag (the MD5); multipart ETags without a
full-object checksum are not verifiable (their part size is unknown), size is.

Credentials: the secret named by ``auth_secret_name`` (S3 JSON, see :mod:`bdn.secrets`),
otherwise the SDK's default chain (``AWS_OIDC``: web identity in the pod environment).
R2 endpoints are derived from the account (``https://<account>.r2.cloudflarestorage.com``);
``endpoint_url`` overrides for any S3-compatible store (MinIO, moto, Ceph).
"""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from typing import Any
from urllib.parse import urlsplit

from bdn.config import Auth, SourceURI
from bdn.errors import AuthError, SourceError
from bdn.secrets import SecretResolver, s3_credentials
from bdn.sources.base import SourceFile
from bdn.sources.bucket import BucketSource
from bdn.transfer.crc import CRC32, crc32c
from bdn.transfer.fetchers import AsyncBody, loop_stream_fetcher
from bdn.transfer.files import Checksum, Fetch
from bdn.transfer.options import DownloadOptions

_MD5_ETAG = re.compile(r"[0-9a-f]{32}")
_AUTH_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
               "ExpiredToken", "InvalidToken", "AllAccessDisabled")


@functools.cache
def _aio_session() -> Any:
    """One botocore session per process, shared by every S3 source: a new one loads and
    parses the S3 service model again (about 0.1 s of CPU per mirror job). Credentials
    are not taken from it when a secret gives them: s3fs passes those per client."""
    import aiobotocore.session

    return aiobotocore.session.AioSession()


class S3Source(BucketSource):
    AUTH_MARKERS = _AUTH_CODES

    def __init__(self, uri: SourceURI, *, secrets: SecretResolver | None = None,
                 auth: Auth | None = None, endpoint_url: str | None = None,
                 s3_endpoint_url: str | None = None, region: str | None = None,
                 download: DownloadOptions | None = None,
                 cancel: threading.Event | None = None,
                 request_slots: threading.Semaphore | None = None, **_: Any) -> None:
        super().__init__(download=download, cancel=cancel, request_slots=request_slots)
        import s3fs

        self.uri = uri.uri
        bucket = uri.bucket
        endpoint = s3_endpoint_url or endpoint_url
        if uri.scheme == "r2":
            account, dot, bucket = bucket.partition(".")
            if not dot or not account or not bucket:
                raise SourceError(f"Source '{uri.uri}': r2:// sources are "
                                  "r2://<account_id>.<bucket>/<path>", source=uri.uri)
            endpoint = endpoint or f"https://{account}.r2.cloudflarestorage.com"
            region = region or "auto"
        self.bucket = bucket
        self.prefix = uri.prefix
        creds = None
        if auth is not None and auth.auth_method == "CUSTOM_SECRET":
            assert auth.auth_secret_name
            creds = s3_credentials((secrets or SecretResolver.from_env())
                                   .get(auth.auth_secret_name))
            endpoint = endpoint or creds.endpoint_url
            region = region or creds.aws_region
        elif auth is not None and auth.auth_method == "AWS_OIDC":
            region = region or auth.aws_oidc_region
        elif auth is not None:
            raise AuthError(f"source {self.uri}: {auth.auth_method} cannot authenticate to "
                            "S3", source=self.uri)
        self._secret_name = auth.auth_secret_name if auth else None
        self.endpoint = endpoint
        d = self.download
        kwargs: dict[str, Any] = {
            # s3fs keeps one filesystem (client, connection pool) per distinct set of
            # these arguments, credentials included: mirrors of the same bucket reuse a
            # warm client instead of building one (about 0.1 s) per job. Listings are
            # never cached, so a reused client cannot see a stale prefix.
            "skip_instance_cache": False,
            "session": _aio_session(),
            "use_listings_cache": False,
            "config_kwargs": {"connect_timeout": d.connect_timeout_s,
                              "read_timeout": d.read_timeout_s,
                              "retries": {"max_attempts": 1, "mode": "standard"},
                              "max_pool_connections": max(d.concurrency * 2, 10)},
        }
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if region:
            kwargs["client_kwargs"] = {"region_name": region}
        if creds is not None:
            kwargs.update(key=creds.aws_access_key_id, secret=creds.aws_secret_access_key)
            if creds.aws_session_token:
                kwargs["token"] = creds.aws_session_token
        self.fs = s3fs.S3FileSystem(**kwargs)
        # bdn's RetryPolicy retries; s3fs's own loop (a class attribute) would multiply it.
        self.fs.retries = 1
        host = urlsplit(endpoint).netloc if endpoint else "aws"
        self._scope = f"{host}/{self.bucket}"
        self._etags: dict[str, str] = {}

    def _describe(self, rel: str, info: dict[str, Any]) -> SourceFile:
        size = int(info.get("size") or info.get("Size") or 0)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"').lower()
        if etag:
            self._etags[rel] = etag
        return SourceFile(rel, size, f"s3-etag:{self._scope}:{etag}:{size}" if etag else None)

    def checksum(self, file: SourceFile) -> Checksum | None:
        # A full-object CRC (one HeadObject) is far cheaper to verify than MD5.
        crc = self._full_object_crc(file)
        if crc is not None:
            return crc
        etag = self._etags.get(file.path, "")
        if _MD5_ETAG.fullmatch(etag):
            return Checksum("md5 (ETag)", etag,
                            lambda: hashlib.md5(usedforsecurity=False))
        return None

    def _full_object_crc(self, file: SourceFile) -> Checksum | None:
        try:
            head = self.fs.call_s3("head_object", Bucket=self.bucket,
                                   Key=self._key(file.path)[len(self.bucket) + 1:],
                                   ChecksumMode="ENABLED")
        except Exception:
            return None  # verification falls back to the ETag; the download reports errors
        if head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
            return None
        kind = crc32c()
        if head.get("ChecksumCRC32C") and kind is not None:
            return Checksum.of_crc(kind, head["ChecksumCRC32C"])
        if head.get("ChecksumCRC32") and "-" not in head["ChecksumCRC32"]:
            return Checksum.of_crc(CRC32, head["ChecksumCRC32"])
        return None

    def fetcher(self, file: SourceFile) -> Fetch:
        key = self._key(file.path)[len(self.bucket) + 1:]

        async def open_body(start: int, end: int) -> AsyncBody:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=key,
                                          Range=f"bytes={start}-{end - 1}")
            return resp["Body"]  # type: ignore[no-any-return]

        return loop_stream_fetcher(self.fs.loop, open_body, lambda e: self._classify(
            e, f"reading {file.path}", file.path))
