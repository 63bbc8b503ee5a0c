"""Hugging Face Hub repositories (``hf://owner/repo[@revision]``) as a source.

Metadata goes through ``huggingface_hub`` (``HfApi.model_info`` with ``files_metadata``),
which resolves the revision — a branch or tag — to the commit it names *now*, and lists
every file with its size and, for LFS files, the sha256 of the content. Pinning records
that commit, and every download names the commit, never the branch, so a push to
``main`` during or after the mirror changes nothing already mirrored.

Fingerprints identify content, not location, so a file shared by two repositories (a
base model's shards in a fine-tune, a common tokenizer) is fetched once:
``hf-lfs-sha256:<hex>`` for LFS files and ``hf-git-sha1:<blob id>:<size>`` for small
files kept in git. Both are collision-resistant enough to share across repositories.

Bytes come from ``{endpoint}/{repo}/resolve/{commit}/{path}`` by parallel ranged GETs,
following the Hub's redirect to its CDN; the token is sent to the Hub only (the HTTP
client strips it on a cross-origin redirect). Each response is read on a blocking
socket by the mirror's thread that hashes and writes it, in 1 MiB blocks
(:mod:`bdn.transfer.http_range`, as for GCS). Every download is verified against the
LFS sha256 or git blob sha1. ``HF_ENDPOINT`` (or the ``endpoint`` option) selects the
Hub, which is how tests point it at a loopback fixture.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

import httpx2
from huggingface_hub import HfApi
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from bdn.config import Auth, SourceURI
from bdn.errors import AuthError, SourceError
from bdn.retry import RetryableError, is_retryable_status, parse_retry_after
from bdn.secrets import SecretResolver, hf_token, scrub
from bdn.sources.base import SourceFile
from bdn.sources.remote import RemoteSource
from bdn.transfer.files import Checksum, Fetch
from bdn.transfer.http_range import USER_AGENT, RangeClient, status_error
from bdn.transfer.options import DownloadOptions
from bdn.transfer.ranged import retry_or_fail

log = logging.getLogger(__name__)

T = TypeVar("T")


class _GitBlobSha1:
    """sha1 of ``"blob <size>\\0" + content`` — the git object id of a file."""

    def __init__(self, size: int) -> None:
        self._h = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class HFSource(RemoteSource):
    def __init__(self, uri: SourceURI, *, secrets: SecretResolver | None = None,
                 auth: Auth | None = None, token: str | None = None,
                 hf_endpoint: str | None = None, download: DownloadOptions | None = None,
                 cancel: threading.Event | None = None,
                 request_slots: threading.Semaphore | None = None, **_: Any) -> None:
        super().__init__(download=download, cancel=cancel, request_slots=request_slots)
        self.uri = uri.uri
        self.repo_id = uri.location
        self.revision = uri.revision or "main"
        self.endpoint = (hf_endpoint or hf_constants.ENDPOINT).rstrip("/")
        if token is None and auth is not None:
            if auth.auth_method != "CUSTOM_SECRET" or not auth.auth_secret_name:
                raise AuthError(f"source {self.uri}: Hugging Face sources authenticate with "
                                f"a token secret (auth_secret_name), not {auth.auth_method}",
                                source=self.uri)
            token = hf_token((secrets or SecretResolver.from_env()).get(auth.auth_secret_name))
        self._token = token
        self._secret_name = auth.auth_secret_name if auth else None
        self._api = HfApi(endpoint=self.endpoint, token=token if token else False)
        self._commit: str | None = None
        self._files: list[SourceFile] | None = None
        self._checksums: dict[str, Checksum] = {}
        self._http = RangeClient(self.download, user_agent=USER_AGENT)

    # -- metadata ------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run a metadata call with retries; map Hub errors to ours without secrets."""

        def attempt() -> T:
            try:
                return fn()
            except GatedRepoError:
                raise AuthError(self._auth_message("is gated and the token given has no "
                                                   "access"), source=self.uri, status=403
                                ) from None
            except RevisionNotFoundError:
                raise SourceError(f"source {self.uri}: revision {self.revision!r} not found",
                                  source=self.uri, status=404) from None
            except RepositoryNotFoundError as e:
                status = e.response.status_code if e.response is not None else 404
                if status in (401, 403):
                    raise AuthError(self._auth_message("refused the credentials"),
                                    source=self.uri, status=status) from None
                raise SourceError(f"source {self.uri}: repository {self.repo_id} not found "
                                  "(or private and no token given)", source=self.uri,
                                  status=status) from None
            except HfHubHTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status in (401, 403):
                    raise AuthError(self._auth_message("refused the credentials"),
                                    source=self.uri, status=status) from None
                if status is not None and is_retryable_status(status):
                    retry_after = parse_retry_after(e.response.headers.get("Retry-After"))
                    raise RetryableError(f"{what}: HTTP {status}", status=status,
                                         retry_after_s=retry_after) from None
                raise SourceError(f"source {self.uri}: {what} failed: HTTP {status}",
                                  source=self.uri, status=status) from None
            except httpx2.TransportError as e:
                raise RetryableError(f"{what}: {type(e).__name__}: {scrub(str(e))}") from None

        return retry_or_fail(attempt, self.download.retry, uri=self.uri, what=what)

    def _auth_message(self, what: str) -> str:
        via = f" (token from secret {self._secret_name!r})" if self._secret_name else \
            " (no token given: set auth_secret_name)"
        return f"source {self.uri}: the Hub {what}{via}"

    def _load(self) -> None:
        if self._files is not None:
            return
        info = self._call("model info", lambda: self._api.model_info(
            self.repo_id, revision=self.revision, files_metadata=True,
            timeout=self.download.read_timeout_s))
        if not info.sha:
            raise SourceError(f"source {self.uri}: the Hub did not report a commit for "
                              f"revision {self.revision!r}", source=self.uri)
        self._commit = info.sha
        files: list[SourceFile] = []
        for s in info.siblings or []:
            if s.lfs is not None:
                size = int(s.lfs.size)
                sha = str(s.lfs.sha256).lower()
                fp: str | None = f"hf-lfs-sha256:{sha}"
                self._checksums[s.rfilename] = Checksum("sha256", sha, hashlib.sha256)
            else:
                size = int(s.size or 0)
                fp = f"hf-git-sha1:{s.blob_id}:{size}" if s.blob_id else None
                if s.blob_id:
                    blob_id = str(s.blob_id)
                    self._checksums[s.rfilename] = Checksum(
                        "git blob sha1", blob_id, lambda n=size: _GitBlobSha1(n))
            files.append(SourceFile(s.rfilename, size, fp))
        self._files = sorted(files, key=lambda f: f.path)

    @property
    def commit(self) -> str:
        self._load()
        assert self._commit is not None
        return self._commit

    def pin(self) -> dict[str, str]:
        self._load()
        return {"uri": self.uri, "scheme": "hf", "repo": self.repo_id,
                "revision": self.revision, "commit": self.commit}

    def list_files(self) -> list[SourceFile]:
        self._load()
        assert self._files is not None
        return list(self._files)

    # -- bytes ---------------------------------------------------------------------

    def file_url(self, file: SourceFile) -> str:
        return (f"{self.endpoint}/{self.repo_id}/resolve/{self.commit}/"
                f"{quote(file.path, safe='/')}")

    def checksum(self, file: SourceFile) -> Checksum | None:
        self._load()
        return self._checksums.get(file.path)

    def fetcher(self, file: SourceFile) -> Fetch:
        url = self.file_url(file)
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}

        def refuse(status: int, response_headers: Mapping[str, str], body: str
                   ) -> BaseException:
            if status in (401, 403):
                return AuthError(self._auth_message("refused the credentials") +
                                 f" while downloading {file.path}", source=self.uri,
                                 file=file.path, status=status)
            if status == 404:
                return SourceError(f"{file.path} from {self.uri}: not found at commit "
                                   f"{self.commit}", source=self.uri, file=file.path,
                                   status=404)
            return status_error(status, response_headers, body, uri=self.uri,
                                path=file.path, service="the Hugging Face Hub")

        # Redirects (to the CDN) are followed; the token is dropped when one leaves the
        # Hub's origin, as the Hub's own client does.
        return self._http.fetcher(url, refuse=refuse, headers=lambda: headers)

    def close(self) -> None:
        super().close()
        self._http.close()
