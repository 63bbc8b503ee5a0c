"""Errors of the node agent; all derive from :class:`BdnError`.

Each carries what a caller needs to act (the digest, the peer, the path, the bytes
asked for and available) as attributes, so the daemon can report them as JSON and the
CLI as one sentence. :class:`RequestError` is the shared class of :mod:`bdn.errors`
(field, message and ``status`` defined there) with :class:`AgentError` added.
"""

from __future__ import annotations

from bdn import errors
from cache.node_errors import BudgetError, DiskFullError, NodeCacheError
from manifests.errors import BdnError

__all__ = ["AgentError", "AgentUnavailable", "BudgetError", "DiskFullError", "FetchError",
           "IdempotencyConflict", "MountError", "NodeCacheError", "PullError", "RequestError",
           "StrictOriginError"]


class AgentError(BdnError):
    """Root of the agent's errors."""


class PullError(AgentError):
    """A pull failed as a whole; ``pull_id`` names it when known."""

    def __init__(self, message: str, *, pull_id: str = "") -> None:
        super().__init__(message)
        self.pull_id = pull_id


class RequestError(errors.RequestError, AgentError):
    """A pull request (JSON body, idempotency key, mount) is invalid; HTTP 400."""


class IdempotencyConflict(RequestError):
    """An ``Idempotency-Key`` was reused with a different request body; HTTP 409."""

    status = 409


class FetchError(AgentError):
    """No tier could deliver a chunk; names the digest and what each tier said."""

    def __init__(self, message: str, *, digest: str = "", attempts: tuple[str, ...] = ()
                 ) -> None:
        super().__init__(message)
        self.digest = digest
        self.attempts = attempts


class StrictOriginError(FetchError):
    """Strict mode: the cache peers failed and the blob store may not be used."""


class MountError(AgentError):
    """A mount cannot be built at the requested place (occupied by foreign files)."""

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class AgentUnavailable(AgentError):
    """The agent's local API did not answer (no daemon on that socket)."""


class AccessDenied(AgentError):
    """The agent refused a call for want of the right release token; HTTP 403."""


__all__ += ["AccessDenied"]


class EventError(AgentError, ValueError):
    """An event of the agent's stream is malformed; names its kind and the field."""

    def __init__(self, message: str, *, kind: str = "", field: str = "") -> None:
        where = f"{kind} event" if kind else "event"
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")
        self.kind = kind
        self.field = field


__all__ += ["EventError"]
