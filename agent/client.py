"""Client of the agent's local API, for the CLI and the serving runtime.

Synchronous on purpose (:mod:`bdn.httpclient`, no event loop): its users are a CLI and a
model server's start-up path, where a blocking call is the simplest correct thing, and
the serving loader already reads the event stream from a thread. Addresses are
``unix:/path/agent.sock`` (or a bare socket path) or ``http://127.0.0.1:PORT``. The
agent's answers become this package's errors through one :class:`~bdn.httpclient.ErrorMap`
(400/409 → :class:`RequestError`, 403 → :class:`AccessDenied`, no answer →
:class:`AgentUnavailable`, anything else → :class:`PullError`). No call is retried: a
pull's start is made safe to repeat by its ``Idempotency-Key``, which is the caller's.

The readiness source of the serving runtime wants an events URL:
:meth:`AgentClient.events_url` gives ``http+unix://<percent-encoded socket>/...`` for a
unix socket, the form ``serving.readiness.EventStreamReadiness`` accepts.

Releasing a pull needs the token the agent returned when the pull was created (see
``agent.daemon``): :meth:`AgentClient.start_pull` keeps it, so the same client releases
its own pulls with a plain :meth:`AgentClient.release`; another process passes it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from agent.errors import AccessDenied, AgentUnavailable, PullError, RequestError
from bdn import settings
from bdn.httpclient import ErrorMap, Failure, HttpClient, HttpUnavailable, Response, unix_url

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
DEFAULT_SOCKET = "/run/bdn/agent.sock"
MAX_EVENT_LINE_BYTES = 1 << 20
TOKEN_HEADER = "X-Bdn-Pull-Token"


def default_socket() -> str:
    return settings.AGENT_SOCKET.get() or DEFAULT_SOCKET


def _any_status(status: int) -> bool:
    return True


class AgentClient:
    """One agent; thread-safe (calls may come from any thread and share its pool)."""

    def __init__(self, address: str | None = None, *,
                 timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        address = address or default_socket()
        if address.startswith("unix:"):
            address = address[len("unix:"):]
        self.address = address
        self.timeout_s = timeout_s
        self._unix = not address.startswith(("http://", "https://"))
        self._tokens: dict[str, str] = {}  # release tokens of the pulls this client started
        errors = ErrorMap(
            statuses={
                400: lambda f: RequestError(f"the agent refused the request: {f.message}"),
                409: lambda f: RequestError(f"the agent refused the request: {f.message}"),
                403: lambda f: AccessDenied(f"the agent refused access: {f.message}"),
            },
            other=lambda f: PullError(f"the agent answered HTTP {f.status}: {f.message}"),
            unavailable=self._unavailable)
        self._http = HttpClient(unix_url(address) if self._unix else address,
                                timeout_s=timeout_s, errors=errors)

    def _unavailable(self, failure: Failure) -> AgentUnavailable:
        return AgentUnavailable(f"the agent at {self.address} did not answer: "
                                f"{failure.message}")

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None) -> Response:
        return self._http.request(method, path, json_body=body, headers=headers)

    # -- API -----------------------------------------------------------------------------

    def healthy(self) -> bool:
        try:
            resp = self._http.request("GET", "/healthz", ok=_any_status)
        except AgentUnavailable:
            return False
        return resp.status == 200

    def start_pull(self, *, ref: str | None = None, mount: str | None = None,
                   weights: list[dict[str, Any]] | None = None, mount_root: str | None = None,
                   prewarm: bool = False, order: str | None = None,
                   idempotency_key: str | None = None) -> dict[str, Any]:
        """Start a pull; returns ``{"id", "state", "created", "events"}`` and ``"token"``
        (needed to release it) when the agent hands it to this caller."""
        body: dict[str, Any] = {}
        if ref is not None:
            body["ref"] = ref
            if mount is not None:
                body["mount"] = os.path.abspath(mount)
        if weights is not None:
            body["weights"] = weights
            if mount_root is not None:
                body["mount_root"] = os.path.abspath(mount_root)
        if prewarm:
            body["prewarm"] = True
        if order is not None:
            body["order"] = order
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        doc = self._request("POST", "/v1/pulls", body, headers).json()
        if doc.get("token"):
            self._tokens[doc["id"]] = doc["token"]
        return doc  # type: ignore[no-any-return]

    def status(self, pull_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/pulls/{pull_id}").json()  # type: ignore[no-any-return]

    def pulls(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/pulls").json()["pulls"]  # type: ignore[no-any-return]

    def agent_status(self) -> dict[str, Any]:
        return self._request("GET", "/v1/status").json()  # type: ignore[no-any-return]

    def release(self, pull_id: str, token: str | None = None) -> dict[str, Any]:
        """Release a pull with ``token`` (default: the one this client got when it
        started the pull); :class:`AccessDenied` without the right one."""
        token = token or self._tokens.get(pull_id)
        headers = {TOKEN_HEADER: token} if token else None
        return self._request(  # type: ignore[no-any-return]
            "DELETE", f"/v1/pulls/{pull_id}", headers=headers).json()

    def metrics(self) -> str:
        doc = self._http.request("GET", "/metrics", ok=_any_status).data()
        return doc if isinstance(doc, str) else json.dumps(doc)

    def events(self, pull_id: str) -> Iterator[dict[str, Any]]:
        """Every event of a pull from the first; ends after ``done`` or ``error``."""
        # The connection and the answer's headers get CONNECT_TIMEOUT_S; then a live
        # pull may be quiet for a while, so the reads wait as long as it takes.
        with self._http.stream("GET", f"/v1/pulls/{pull_id}/events",
                               headers={"Accept": "application/x-ndjson"},
                               timeout_s=CONNECT_TIMEOUT_S, read_timeout_s=None,
                               ok=lambda s: s == 200) as resp:
            try:
                for line in resp.lines(MAX_EVENT_LINE_BYTES):
                    if line.strip():
                        ev = json.loads(line)
                        yield ev
                        if ev.get("event") in ("done", "error"):
                            return
            except HttpUnavailable as e:
                raise self._unavailable(Failure("GET", e.url, 0, e.reason)) from None

    def wait(self, pull_id: str, on_event: Callable[[dict[str, Any]], None] | None = None
             ) -> dict[str, Any]:
        """Follow the events until the pull ends; the final status, or :class:`PullError`."""
        for ev in self.events(pull_id):
            if on_event is not None:
                on_event(ev)
            if ev.get("event") == "error":
                raise PullError(f"pull {pull_id} failed: {ev.get('message')}",
                                pull_id=pull_id)
        st = self.status(pull_id)
        if st["state"] != "done":
            raise PullError(f"pull {pull_id} ended in state {st['state']}: {st.get('error')}",
                            pull_id=pull_id)
        return st

    def events_url(self, pull_id: str) -> str:
        path = f"/v1/pulls/{pull_id}/events"
        if self._unix:
            return unix_url(os.path.abspath(self.address), path)
        return self.address.rstrip("/") + path
