"""A small synchronous client of the control server's API, for the CLI and scripts.

Synchronous (:mod:`bdn.httpclient`): the CLI makes a handful of calls per command, so an
event loop buys nothing. Errors come back as :class:`control.errors.ClientError` carrying
the server's status and its sentence (which names the field or id involved). The API key
is sent in the ``Authorization`` header and never printed. No call is retried: a
command the server half-did is for the user to look at, not to repeat.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bdn import settings
from bdn.httpclient import ErrorMap, Failure, HttpClient
from control.errors import ClientError

DEFAULT_SERVER_URL = "http://127.0.0.1:8700"
SERVER_URL_ENV = settings.CONTROL_URL.name
API_KEY_ENV = settings.API_KEY.name
DEFAULT_TIMEOUT_S = 60.0
UPLOAD_TIMEOUT_S = 600.0
# Between two lines of a streamed answer (a push mirroring a large file stays quiet).
STREAM_TIMEOUT_S = 3600.0
# One line of a streamed answer (a deployment record, a progress event).
MAX_STREAM_LINE_BYTES = 16 << 20


class ControlClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = (base_url or settings.CONTROL_URL.get()
                         or DEFAULT_SERVER_URL).rstrip("/")
        api_key = api_key or settings.API_KEY.get() or ""
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else {}
        self._http = HttpClient(self.base_url, timeout_s=timeout_s, headers=headers,
                                errors=ErrorMap(other=_answered, unavailable=self._unreached))

    def __repr__(self) -> str:  # never show the key
        return f"ControlClient({self.base_url!r})"

    def _unreached(self, failure: Failure) -> ClientError:
        return ClientError(f"cannot reach the control server at {self.base_url}: "
                           f"{failure.message} (set --server or {SERVER_URL_ENV})",
                           status=0, url=failure.url)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, body: Any = None, *,
                raw: bytes | None = None, timeout_s: float | None = None) -> Any:
        headers = {"Content-Type": "application/json"} if raw is not None else None
        payload = self._http.request(method, path, json_body=body if raw is None else None,
                                     body=raw, headers=headers,
                                     timeout_s=timeout_s).body
        if not payload:
            return None
        try:
            return json.loads(payload)
        except json.JSONDecodeError:
            return payload.decode(errors="replace")

    def upload(self, path: str, file: Path) -> Any:
        """PUT a file's bytes (streamed from disk, not read into memory first)."""
        with open(file, "rb") as f:
            resp = self._http.request(
                "PUT", path, body=f, timeout_s=UPLOAD_TIMEOUT_S,
                headers={"Content-Type": "application/octet-stream",
                         "Content-Length": str(os.fstat(f.fileno()).st_size)})
        return json.loads(resp.body or b"null")

    def stream(self, method: str, path: str, body: Any = None, *,
               timeout_s: float = STREAM_TIMEOUT_S) -> Iterator[dict[str, Any]]:
        """The JSON lines of a streamed answer (one object each); a plain JSON answer
        comes back as its one object."""
        with self._http.stream(method, path, json_body=body, timeout_s=timeout_s,
                               headers={"Accept": "application/x-ndjson"}) as resp:
            if "ndjson" not in resp.headers.get("Content-Type", ""):
                yield dict(json.loads(resp.read()), event="deployment")
                return
            for line in resp.lines(MAX_STREAM_LINE_BYTES):
                if line.strip():
                    yield json.loads(line)

    # -- conveniences ------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/models")["models"])

    def find_model(self, name_or_id: str) -> dict[str, Any] | None:
        models = self.models()
        for m in models:
            if m["id"] == name_or_id:
                return m
        return next((m for m in models if m["name"] == name_or_id), None)

    def model(self, name_or_id: str) -> dict[str, Any]:
        found = self.find_model(name_or_id)
        if found is None:
            raise ClientError(f"model {name_or_id!r} not found", status=404)
        return found

    def deployments(self, model_id: str) -> list[dict[str, Any]]:
        return list(self.request("GET", f"/v1/models/{q(model_id)}/deployments")["deployments"])

    def environments(self, model_id: str) -> list[dict[str, Any]]:
        return list(self.request("GET",
                                 f"/v1/models/{q(model_id)}/environments")["environments"])

    def environment(self, model_id: str, name: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/models/{q(model_id)}/environments/{q(name)}"))

    def predict_path(self, model_id: str, *, environment: str | None = None,
                     deployment: str | None = None, development: bool = False) -> str:
        base = f"/models/{q(model_id)}"
        if development:
            return f"{base}/development/predict"
        if deployment:
            return f"{base}/deployment/{q(deployment)}/predict"
        if environment and environment != "production":
            return f"{base}/environments/{q(environment)}/predict"
        return f"{base}/production/predict"


def _answered(failure: Failure) -> ClientError:
    return ClientError(f"{failure.message} (HTTP {failure.status})", status=failure.status,
                       url=failure.url)


def q(part: str) -> str:
    return urllib.parse.quote(part, safe="")
