"""Errors of the ``bdn`` package; all derive from :class:`manifests.errors.BdnError`."""

from __future__ import annotations

from manifests.errors import (
    BdnError,
    DigestError,
    IntegrityError,
    ManifestError,
    PathError,
    RefError,
    SafetensorsError,
)

__all__ = [
    "AuthError",
    "BdnError",
    "ConfigError",
    "DigestError",
    "IntegrityError",
    "ManifestError",
    "MirrorError",
    "NotFoundError",
    "PathError",
    "RefError",
    "SafetensorsError",
    "SourceError",
    "StoreError",
    "StoreFullError",
]


class ConfigError(BdnError, ValueError):
    """A ``config.yaml`` (or a ``weights:`` entry) is invalid; names index and field."""

    def __init__(self, message: str, *, index: int | None = None, field: str = "") -> None:
        where = []
        if index is not None:
            where.append(f"weights[{index}]")
        if field:
            where.append(field)
        prefix = ".".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.index = index
        self.field = field


class StoreError(BdnError):
    """The blob store failed or holds something unexpected; names the store URL/key."""

    def __init__(self, message: str, *, url: str = "", key: str = "") -> None:
        super().__init__(message)
        self.url = url
        self.key = key


class StoreFullError(StoreError):
    """The store's file system refused space (ENOSPC / EDQUOT): the store is full.
    ``path`` is the file being written, ``needed`` the bytes it was to hold."""

    def __init__(self, message: str, *, url: str = "", key: str = "", path: str = "",
                 needed: int = 0) -> None:
        super().__init__(message, url=url, key=key)
        self.path = path
        self.needed = needed


class NotFoundError(StoreError, KeyError):
    """An object, manifest or ref is not in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SourceError(BdnError):
    """Reading from an upstream source failed; names the source URI and file."""

    def __init__(self, message: str, *, source: str = "", file: str = "",
                 status: int | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.file = file
        self.status = status


class AuthError(SourceError):
    """Credentials were missing or refused. The message never contains the secret."""


class MirrorError(BdnError):
    """A mirror job failed as a whole."""
