"""Client of the agent's local API, for the CLI and the serving runtime.

Synchronous on purpose (``http.client``, no event loop): its users are a CLI and a model
server's start-up path, where a blocking call is the simplest correct thing, and the
serving loader already reads the event stream from a thread. Addresses are
``unix:/path/agent.sock`` (or a bare socket path) or ``http://127.0.0.1:PORT``.

The readiness source of the serving runtime wants an events URL:
:meth:`AgentClient.events_url` gives ``http+unix://<percent-encoded socket>/...`` for a
unix socket, the form ``serving.readiness.EventStreamReadiness`` accepts.

Releasing a pull needs the token the agent returned when the pull was created (see
``agent.daemon``): :meth:`AgentClient.start_pull` keeps it, so the same client releases
its own pulls with a plain :meth:`AgentClient.release`; another process passes it.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit

from agent.errors import AccessDenied, AgentUnavailable, PullError, RequestError
from bdn import settings

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 60.0
DEFAULT_SOCKET_ENV = "BDN_AGENT_SOCKET"
DEFAULT_SOCKET = "/run/bdn/agent.sock"
MAX_EVENT_LINE_BYTES = 1 << 20
TOKEN_HEADER = "X-Bdn-Pull-Token"


def default_socket() -> str:
    return settings.AGENT_SOCKET.get() or DEFAULT_SOCKET


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AgentClient:
    """One agent. Every call opens its own connection (calls may come from any thread)."""

    def __init__(self, address: str | None = None, *,
                 timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        address = address or default_socket()
        if address.startswith("unix:"):
            address = address[len("unix:"):]
        self.address = address
        self.timeout_s = timeout_s
        self._unix = not address.startswith(("http://", "https://"))
        self._tokens: dict[str, str] = {}  # release tokens of the pulls this client started

    def _conn(self, timeout: float | None = None) -> http.client.HTTPConnection:
        t = self.timeout_s if timeout is None else timeout
        if self._unix:
            return _UnixConnection(self.address, t)
        parts = urlsplit(self.address)
        return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=t)

    def _request(self, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None) -> tuple[int, Any]:
        conn = self._conn()
        try:
            data = None if body is None else json.dumps(body).encode()
            hdrs = {"Content-Type": "application/json"} if data is not None else {}
            hdrs.update(headers or {})
            try:
                conn.request(method, path, body=data, headers=hdrs)
                resp = conn.getresponse()
                raw = resp.read()
            except OSError as e:
                raise AgentUnavailable(f"the agent at {self.address} did not answer: "
                                       f"{e}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            doc = raw.decode("utf-8", "replace")
        return resp.status, doc

    @staticmethod
    def _raise(status: int, doc: Any) -> None:
        msg = doc.get("error") if isinstance(doc, dict) else str(doc)
        if status in (400, 409):
            raise RequestError(f"the agent refused the request: {msg}")
        if status == 403:
            raise AccessDenied(f"the agent refused access: {msg}")
        raise PullError(f"the agent answered HTTP {status}: {msg}")

    # -- API -----------------------------------------------------------------------------

    def healthy(self) -> bool:
        try:
            status, _ = self._request("GET", "/healthz")
        except AgentUnavailable:
            return False
        return status == 200

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
        status, doc = self._request("POST", "/v1/pulls", body, headers)
        if status not in (200, 202):
            self._raise(status, doc)
        if doc.get("token"):
            self._tokens[doc["id"]] = doc["token"]
        return doc  # type: ignore[no-any-return]

    def status(self, pull_id: str) -> dict[str, Any]:
        status, doc = self._request("GET", f"/v1/pulls/{pull_id}")
        if status != 200:
            self._raise(status, doc)
        return doc  # type: ignore[no-any-return]

    def pulls(self) -> list[dict[str, Any]]:
        status, doc = self._request("GET", "/v1/pulls")
        if status != 200:
            self._raise(status, doc)
        return doc["pulls"]  # type: ignore[no-any-return]

    def agent_status(self) -> dict[str, Any]:
        status, doc = self._request("GET", "/v1/status")
        if status != 200:
            self._raise(status, doc)
        return doc  # type: ignore[no-any-return]

    def release(self, pull_id: str, token: str | None = None) -> dict[str, Any]:
        """Release a pull with ``token`` (default: the one this client got when it
        started the pull); :class:`AccessDenied` without the right one."""
        token = token or self._tokens.get(pull_id)
        headers = {TOKEN_HEADER: token} if token else None
        status, doc = self._request("DELETE", f"/v1/pulls/{pull_id}", headers=headers)
        if status != 200:
            self._raise(status, doc)
        return doc  # type: ignore[no-any-return]

    def metrics(self) -> str:
        _status, doc = self._request("GET", "/metrics")
        return doc if isinstance(doc, str) else json.dumps(doc)

    def events(self, pull_id: str) -> Iterator[dict[str, Any]]:
        """Every event of a pull from the first; ends after ``done`` or ``error``."""
        conn = self._conn(timeout=CONNECT_TIMEOUT_S)
        try:
            try:
                conn.request("GET", f"/v1/pulls/{pull_id}/events",
                             headers={"Accept": "application/x-ndjson"})
                resp = conn.getresponse()
            except OSError as e:
                raise AgentUnavailable(f"the agent at {self.address} did not answer: "
                                       f"{e}") from None
            if resp.status != 200:
                self._raise(resp.status, resp.read().decode("utf-8", "replace"))
            if conn.sock is not None:
                conn.sock.settimeout(None)  # a live pull may be quiet for a while
            while True:
                line = resp.readline(MAX_EVENT_LINE_BYTES)
                if not line:
                    return
                if line.strip():
                    ev = json.loads(line)
                    yield ev
                    if ev.get("event") in ("done", "error"):
                        return
        finally:
            conn.close()

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
            return f"http+unix://{quote(os.path.abspath(self.address), safe='')}{path}"
        return self.address.rstrip("/") + path
