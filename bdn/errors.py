"""Errors of the ``bdn`` package; all derive from :class:`manifests.errors.BdnError`.

Errors that mean the same thing in several packages are defined once here, with every
field any of them carries: :class:`RequestError` (a malformed request or argument),
:class:`NotFoundError` (something named does not exist) and :class:`AuthError`
(credentials missing or refused). ``agent.errors`` and ``control.errors`` subclass them
only to add their package's root (``AgentError``, ``ControlError``), so ``except
RequestError`` from any of the three modules catches what it caught before, and the
fields, message format and HTTP ``status`` are written once. The shared class comes
first in those subclasses' bases, so its ``status`` and ``__init__`` are the ones used.
"""

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
    "RequestError",
    "SafetensorsError",
    "SettingError",
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


class SettingError(ConfigError):
    """A ``BDN_*`` environment variable holds a value its setting cannot take; names the
    variable (``variable``, also the message's prefix)."""

    def __init__(self, message: str, *, variable: str) -> None:
        super().__init__(message, field=variable)
        self.variable = variable


class RequestError(BdnError, ValueError):
    """A request (an API body, an argument, a flag) is malformed; names the field.

    ``status`` is the HTTP status a server answers it with."""

    status = 400

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
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
    """Something named does not exist: an object, manifest or ref in the store (``url``,
    ``key``), or a model, deployment or environment of the control plane (``kind``,
    ``ident``). ``status`` is the HTTP status a server answers it with."""

    status = 404

    def __init__(self, message: str, *, url: str = "", key: str = "", kind: str = "",
                 ident: str = "") -> None:
        super().__init__(message, url=url, key=key)
        self.kind = kind
        self.ident = ident

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
    """Credentials were missing or refused. The message never contains the secret.

    ``status`` is the HTTP status of the refusal: what an upstream source answered
    (None when it was not an HTTP answer), or what one of bdn's own servers answers."""


class MirrorError(BdnError):
    """A mirror job failed as a whole."""
