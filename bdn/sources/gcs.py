"""Google Cloud Storage buckets (``gs://bucket/prefix``) as a source, through ``gcsfs``.

Listing gives each object's size, MD5 (base64) and generation. The fingerprint is
``gcs-md5:<bucket>:<md5 b64>:<size>`` — scoped to the bucket for the same reason as S3
ETags (MD5 resists accidents, not adversaries). Composite objects carry only a CRC32C,
which identifies nothing, so they get no fingerprint and are always fetched. Downloads
are parallel ranged reads of the media URL gcsfs's own ``get_file`` reads, with its auth
headers, on blocking sockets (:mod:`bdn.transfer.http_range`; public ranged reads if those
internals ever change), verified against the object's CRC32C (hardware accelerated; MD5
when no fast CRC32C is installed).

Two settings matter against emulators and S3-style endpoints: the *core*
``gcsfs.core.GCSFileSystem`` is used when ``endpoint_url`` is set, because the default
class (``ExtendedGcsFileSystem``, enabled by ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT``) first
asks the Storage Control API over gRPC what kind of bucket it is — an emulator never
answers, and the probe waits out a 60 s deadline on *every* call because an unknown
result is not cached. Without an endpoint (real GCS) the default class is kept, since it
is what reads zonal buckets. And credentials: a service-account JSON secret, otherwise
Google's default chain (``GCP_OIDC``: workload identity), or anonymous against an
emulator.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from bdn.cloudfs import gcs_filesystem_class
from bdn.config import Auth, SourceURI
from bdn.errors import AuthError
from bdn.secrets import SecretResolver, gcs_service_account
from bdn.sources.base import SourceFile
from bdn.sources.bucket import BucketSource
from bdn.transfer.crc import crc32c
from bdn.transfer.fetchers import fsspec_fetcher
from bdn.transfer.files import Checksum, Fetch
from bdn.transfer.http_range import USER_AGENT, RangeClient, status_error
from bdn.transfer.options import DownloadOptions

# Only for a gcsfs whose internals differ from what ``fetcher`` streams through.
BLOCK_BYTES = 8 * 1024 * 1024
_AUTH_HINTS = ("401", "403", "Forbidden", "Unauthorized", "invalid_grant",
               "does not have storage")


def gcs_filesystem(*, endpoint_url: str | None, token: Any, timeout_s: float | None = None,
                   project: str | None = None) -> Any:
    """A gcsfs filesystem; the core class (no gRPC bucket-type probe) for custom endpoints."""
    kwargs: dict[str, Any] = {"token": token, "skip_instance_cache": True,
                              "project": project or "bdn"}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if timeout_s:
        kwargs["timeout"] = timeout_s
    return gcs_filesystem_class(endpoint_url)(**kwargs)


class _B64Md5:
    """MD5 whose ``hexdigest`` is GCS's base64 form, to compare with ``md5Hash``."""

    def __init__(self) -> None:
        self._h = hashlib.md5(usedforsecurity=False)

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return base64.b64encode(self._h.digest()).decode()


class GCSSource(BucketSource):
    SERVICE = "GCS"
    AUTH_MARKERS = _AUTH_HINTS

    def __init__(self, uri: SourceURI, *, secrets: SecretResolver | None = None,
                 auth: Auth | None = None, endpoint_url: str | None = None,
                 gcs_endpoint_url: str | None = None,
                 download: DownloadOptions | None = None,
                 cancel: threading.Event | None = None,
                 request_slots: threading.Semaphore | None = None, **_: Any) -> None:
        super().__init__(download=download, cancel=cancel, request_slots=request_slots)
        self.uri = uri.uri
        self.bucket = uri.bucket
        self.prefix = uri.prefix
        endpoint = gcs_endpoint_url or endpoint_url
        token: Any
        if auth is not None and auth.auth_method == "CUSTOM_SECRET":
            assert auth.auth_secret_name
            token = gcs_service_account((secrets or SecretResolver.from_env())
                                        .get(auth.auth_secret_name))
        elif auth is not None and auth.auth_method != "GCP_OIDC":
            raise AuthError(f"source {self.uri}: {auth.auth_method} cannot authenticate to "
                            "GCS", source=self.uri)
        else:
            token = "anon" if endpoint else "google_default"
        self.endpoint = endpoint
        self.fs = gcs_filesystem(endpoint_url=endpoint, token=token,
                                 timeout_s=self.download.read_timeout_s)
        self._md5: dict[str, str] = {}
        self._crc32c: dict[str, str] = {}
        self._http = RangeClient(self.download, user_agent=USER_AGENT)

    def _describe(self, rel: str, info: dict[str, Any]) -> SourceFile:
        size = int(info.get("size") or 0)
        md5 = info.get("md5Hash")
        if md5:
            self._md5[rel] = str(md5)
        if info.get("crc32c"):
            self._crc32c[rel] = str(info["crc32c"])
        return SourceFile(rel, size, f"gcs-md5:{self.bucket}:{md5}:{size}" if md5 else None)

    def checksum(self, file: SourceFile) -> Checksum | None:
        crc = self._crc32c.get(file.path)
        # Hardware CRC32C runs at several GB/s, MD5 at ~0.5 GB/s a core: on a small
        # machine MD5 would cap the mirror. CRC32C catches transfer corruption; identity
        # (the fingerprint) still rests on the MD5.
        kind = crc32c()
        if crc and kind is not None:
            return Checksum.of_crc(kind, crc)
        md5 = self._md5.get(file.path)
        return Checksum("md5", md5, _B64Md5) if md5 else None

    def fetcher(self, file: SourceFile) -> Fetch:
        fs = self.fs
        if not all(hasattr(fs, a) for a in ("url", "_get_headers", "_get_params")):
            # An unfamiliar gcsfs: ranged reads through its public API, one per block.
            return fsspec_fetcher(fs, self._key(file.path), file.path, BLOCK_BYTES,
                                  lambda e, where, path: self._classify(e, where, path))
        # The media URL and auth headers gcsfs's own get_file uses, read on blocking
        # sockets by the part's thread (bdn.transfer.http_range).
        url = fs.url(self._key(file.path))
        params = fs._get_params({})
        if params:
            url += "&" + urlencode(params)

        def refuse(status: int, headers: Mapping[str, str], body: str) -> BaseException:
            return status_error(status, headers, body, uri=self.uri, path=file.path,
                                service=self.SERVICE)

        return self._http.fetcher(url, refuse=refuse, headers=lambda: fs._get_headers({}))

    def close(self) -> None:
        super().close()
        self._http.close()
