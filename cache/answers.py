"""The JSON error answers of the cache pod's routes, one shape for all of them.

Every route of the owner process words its refusals as ``{"error": sentence,
"digest": ...}`` and says when to come back in ``Retry-After``; the fills' failures map
to statuses in one place (:func:`fill_error_response`) because both an object answer
(:mod:`cache.serve_objects`) and a prefetch (:mod:`cache.prefetch`) report them. The
unauthenticated POST routes read their JSON bodies the one way too
(:func:`read_json_object`): within the body timeout, else 408 and the connection closed,
so a client that trickles its body cannot hold a handler.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from bdn.errors import NotFoundError
from cache.errors import FillIntegrityError, StoreUnavailableError
from manifests.digest import Digest

RETRY_AFTER_S = 1


def error_response(status: int, message: str, digest: str = "",
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": message}
    if digest:
        body["digest"] = digest
    return web.json_response(body, status=status, headers=headers)


def retry_later(message: str, digest: str = "") -> web.Response:
    """503 with ``Retry-After``: a passing shortage (store, descriptors, a vanished file)."""
    return error_response(503, message, digest, {"Retry-After": str(RETRY_AFTER_S)})


def fill_error_response(error: BaseException, digest: Digest) -> web.Response:
    """How a failed fill of ``digest`` is answered: 404, 502, 503 or 500."""
    if isinstance(error, NotFoundError):
        return error_response(404, str(error), str(digest))
    if isinstance(error, FillIntegrityError):
        return error_response(502, str(error), str(digest))
    if isinstance(error, StoreUnavailableError):
        return retry_later(str(error), str(digest))
    return error_response(500, f"filling {digest} failed: {error}", str(digest))


async def read_json_object(request: web.Request, timeout_s: float) -> dict[str, Any] | None:
    """The request's JSON object, read within ``timeout_s``; None when the body did not
    arrive in time. Raises ValueError for anything but a JSON object."""
    try:
        async with asyncio.timeout(timeout_s):
            body = await request.json()
    except TimeoutError:
        return None
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return body


def body_timeout_response(what: str, timeout_s: float) -> web.Response:
    """408 for a ``what`` request whose body did not arrive within ``timeout_s``."""
    return error_response(408, f"{what} body not received within {timeout_s:g} s",
                          headers={"Connection": "close"})
