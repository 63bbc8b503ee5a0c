"""What the S3 and GCS sources share: a bucket and a prefix behind an fsspec filesystem.

Both list the prefix with one ``find`` (retried under the download policy), name objects
by ``bucket/prefix/relative path``, pin the same fields and map the filesystem's errors
the same way (:func:`classify_fs_error`); only the per-object
metadata differs — what identifies an object (S3 ETag, GCS MD5) and what verifies its
bytes — so a subclass says how to describe one listed object and nothing else of the
listing.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from bdn.errors import AuthError, SourceError
from bdn.secrets import scrub
from bdn.sources.base import SourceFile
from bdn.sources.remote import RemoteSource
from bdn.transfer.ranged import retry_or_fail, transport_error

T = TypeVar("T")


class BucketSource(RemoteSource):
    """A remote source over ``fs`` (s3fs, gcsfs): subclasses set ``uri``, ``bucket``,
    ``prefix``, ``endpoint`` and ``fs`` in their constructor."""

    SERVICE = "the store"  # how error messages name the service
    AUTH_MARKERS: tuple[str, ...] = ()  # error texts that mean "access denied"

    bucket: str
    prefix: str
    endpoint: str | None
    fs: Any
    _files: list[SourceFile] | None = None

    @abstractmethod
    def _describe(self, rel: str, info: dict[str, Any]) -> SourceFile:
        """The listed object ``rel`` (relative to the prefix), from its ``find`` info."""

    def _key(self, rel: str) -> str:
        return f"{self.bucket}/{self.prefix}/{rel}" if self.prefix else f"{self.bucket}/{rel}"

    def _classify(self, exc: BaseException, where: str, path: str = "") -> BaseException:
        return classify_fs_error(exc, where, self.uri, path, service=self.SERVICE,
                                 auth_markers=self.AUTH_MARKERS)

    def _retrying(self, what: str, fn: Callable[[], T], path: str = "") -> T:
        def attempt() -> T:
            try:
                return fn()
            except (AuthError, SourceError):
                raise
            except Exception as e:
                raise self._classify(e, what, path) from None

        return retry_or_fail(attempt, self.download.retry, uri=self.uri, what=what, path=path)

    def pin(self) -> dict[str, str]:
        out = {"uri": self.uri, "scheme": self.uri.split("://", 1)[0], "bucket": self.bucket,
               "prefix": self.prefix}
        if self.endpoint:
            out["endpoint"] = self.endpoint
        return out

    def list_files(self) -> list[SourceFile]:
        if self._files is not None:
            return list(self._files)
        root = f"{self.bucket}/{self.prefix}".rstrip("/")
        found: dict[str, dict[str, Any]] = self._retrying(
            "listing", lambda: self.fs.find(root, detail=True, withdirs=False))
        files = []
        for key, info in found.items():
            if info.get("type") == "directory" or key.endswith("/"):
                continue
            rel = key[len(root):].lstrip("/") if key != root else key.rsplit("/", 1)[-1]
            if rel:
                files.append(self._describe(rel, info))
        self._files = sorted(files, key=lambda f: f.path)
        return list(self._files)


def classify_fs_error(exc: BaseException, where: str, uri: str, path: str = "", *,
                      service: str, auth_markers: tuple[str, ...]) -> BaseException:
    """Map an fsspec (s3fs/gcsfs) failure to AuthError / SourceError / RetryableError.

    Denials and missing objects are final; bad arguments are final; everything else
    (5xx, throttling, timeouts, resets) is worth another attempt. Secrets are scrubbed
    from the text before it reaches any message.
    """
    text = scrub(str(exc))
    if isinstance(exc, PermissionError) or any(m in text for m in auth_markers):
        return AuthError(f"source {uri}: {where}: access denied by {service} ({text}); "
                         "check the credentials secret", source=uri, file=path, status=403)
    if isinstance(exc, FileNotFoundError):
        return SourceError(f"source {uri}: {where}: not found", source=uri, file=path,
                           status=404)
    if isinstance(exc, (ValueError, TypeError)):
        return SourceError(f"source {uri}: {where}: {text}", source=uri, file=path)
    return transport_error(exc, where)
