"""Errors of the control plane; each names the field, id or environment involved.

Every error carries the HTTP status the management API answers with, so handlers map an
exception to a response in one place and the CLI can print the same sentence the server
sent. All derive from :class:`manifests.errors.BdnError` (via ``bdn.errors``).

:class:`RequestError`, :class:`NotFoundError` and :class:`AuthError` are the shared
classes of :mod:`bdn.errors` (fields, message and ``status`` defined there) with
:class:`ControlError` added, so ``except ControlError`` still catches them.
"""

from __future__ import annotations

from bdn import errors
from bdn.errors import BdnError


class ControlError(BdnError):
    """Root of control-plane errors; ``status`` is the HTTP status to answer with."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)


class SettingsError(ControlError, ValueError):
    """An autoscaling setting is missing its type or out of its documented range."""

    def __init__(self, message: str, *, field: str, allowed: str = "") -> None:
        super().__init__(f"{field}: {message}" + (f" (allowed: {allowed})" if allowed else ""))
        self.field = field
        self.allowed = allowed


class RequestError(errors.RequestError, ControlError):
    """A request body or argument is malformed; names the field."""


class NotFoundError(errors.NotFoundError, ControlError):
    """A model, deployment or environment does not exist (or is inactive); names its
    ``kind`` and ``ident``."""


class ConflictError(ControlError):
    """The request conflicts with the current state (duplicate name, promotion running)."""

    status = 409

    def __init__(self, message: str, *, ident: str = "") -> None:
        super().__init__(message)
        self.ident = ident


# SourceError's status may be None (a refusal that was not an HTTP answer); here it is
# always the 401 (or given status) the API answers with.
class AuthError(errors.AuthError, ControlError):  # type: ignore[misc]
    """No API key, or a wrong one. The message never contains the key."""

    def __init__(self, message: str, *, status: int = 401) -> None:
        super().__init__(message, status=status)


class UnavailableError(ControlError):
    """No replica could serve the request in time (queue full, timeout, start failure)."""

    status = 503

    def __init__(self, message: str, *, deployment_id: str) -> None:
        super().__init__(message)
        self.deployment_id = deployment_id


class BackendError(ControlError):
    """A replica backend failed to start or stop a replica; names the replica."""

    status = 502

    def __init__(self, message: str, *, replica: str = "") -> None:
        super().__init__(message)
        self.replica = replica


class ClientError(ControlError):
    """The control server answered a CLI request with an error (status and server text)."""

    def __init__(self, message: str, *, status: int, url: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.url = url


class QueueFullError(UnavailableError):
    """A deployment already holds ``max_queue`` waiting requests; retry after a while."""

    status = 429

    def __init__(self, message: str, *, deployment_id: str, retry_after_s: int) -> None:
        super().__init__(message, deployment_id=deployment_id)
        self.retry_after_s = retry_after_s


class RequestBodyError(ControlError):
    """A request body did not arrive whole (408: too slow; 400: the client broke it off
    or sent malformed framing); names the deployment it was for."""

    def __init__(self, message: str, *, status: int, deployment_id: str) -> None:
        super().__init__(message)
        self.status = status
        self.deployment_id = deployment_id
