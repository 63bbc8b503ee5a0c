"""Errors of the cluster cache (server, disk store and ring client).

Every error names what it is about — the digest, the peer or store URL — as attributes
as well as in its message, so the node agent can decide what to do (try the next peer,
report a bad copy, give up) without parsing text. All derive from
:class:`manifests.errors.BdnError`; "not found" also derives from
:class:`bdn.errors.NotFoundError` so a caller that handles the blob store's
not-found handles the cache's too.
"""

from __future__ import annotations

from collections.abc import Sequence

from bdn.errors import BdnError, NotFoundError


class CacheError(BdnError):
    """Something in the cache tier failed; names the digest and URL involved."""

    def __init__(self, message: str, *, digest: str = "", url: str = "") -> None:
        super().__init__(message)
        self.digest = digest
        self.url = url


class CacheNotFoundError(NotFoundError):
    """No peer and no store holds the object, manifest or ref."""

    def __init__(self, message: str, *, digest: str = "", url: str = "") -> None:
        super().__init__(message, url=url, key=digest)
        self.digest = digest


class CacheUnavailableError(CacheError):
    """Every peer tried (and the store, unless strict origin) failed to answer.

    ``peers_tried`` lists the peers in the order they were tried; ``last_error`` is the
    last failure seen, for the log.
    """

    def __init__(self, message: str, *, digest: str = "", peers_tried: Sequence[str] = (),
                 last_error: str = "", url: str = "") -> None:
        super().__init__(message, digest=digest, url=url)
        self.peers_tried = tuple(peers_tried)
        self.last_error = last_error


class RangeNotSatisfiableError(CacheError, ValueError):
    """A byte range starts at or past the end of the object."""

    def __init__(self, message: str, *, digest: str = "", size: int | None = None,
                 url: str = "") -> None:
        super().__init__(message, digest=digest, url=url)
        self.size = size


class FillError(CacheError):
    """Filling an object from the blob store failed; nothing of it was kept."""


class StoreUnavailableError(FillError):
    """The blob store could not be read (down, refusing, timing out)."""


class FillIntegrityError(FillError):
    """The bytes read from the store do not hash to the digest that names them."""


class DiskStoreError(CacheError):
    """The cache's own disk store or index is unusable (names the folder)."""


class WorkerError(CacheError):
    """A worker process of a multi-process cache server failed to start or to run."""
