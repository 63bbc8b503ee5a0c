"""A small synchronous client of the control server's API, for the CLI and scripts.

Standard library only (``urllib``): the CLI makes a handful of calls per command, so an
event loop buys nothing. Errors come back as :class:`control.errors.ClientError` carrying
the server's status and its sentence (which names the field or id involved). The API key
is sent in the ``Authorization`` header and never printed.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bdn import settings
from control.errors import ClientError

DEFAULT_SERVER_URL = "http://127.0.0.1:8700"
SERVER_URL_ENV = "BDN_CONTROL_URL"
API_KEY_ENV = "BDN_API_KEY"
DEFAULT_TIMEOUT_S = 60.0
UPLOAD_TIMEOUT_S = 600.0
# Between two lines of a streamed answer (a push mirroring a large file stays quiet).
STREAM_TIMEOUT_S = 3600.0


class ControlClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.base_url = (base_url or settings.CONTROL_URL.get()
                         or DEFAULT_SERVER_URL).rstrip("/")
        self._api_key = api_key or settings.API_KEY.get() or ""
        self.timeout_s = timeout_s

    def __repr__(self) -> str:  # never show the key
        return f"ControlClient({self.base_url!r})"

    def _open(self, method: str, path: str, data: Any, *, content_type: str,
              accept: str | None = None, timeout_s: float | None = None,
              length: int | None = None) -> Any:
        url = self.base_url + path
        req = urllib.request.Request(url, data=data, method=method)
        if self._api_key:
            req.add_header("Authorization", f"Api-Key {self._api_key}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        if length is not None:
            req.add_header("Content-Length", str(length))
        if accept:
            req.add_header("Accept", accept)
        try:
            return urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s)
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                message = json.loads(text).get("error") or text
            except (json.JSONDecodeError, AttributeError):
                message = text or e.reason
            raise ClientError(f"{message} (HTTP {e.code})", status=e.code, url=url) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise ClientError(f"cannot reach the control server at {self.base_url}: {reason} "
                              f"(set --server or {SERVER_URL_ENV})", status=0, url=url) from None

    def request(self, method: str, path: str, body: Any = None, *,
                raw: bytes | None = None, timeout_s: float | None = None) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        with self._open(method, path, data, content_type="application/json",
                        timeout_s=timeout_s) as resp:
            payload = resp.read()
        if not payload:
            return None
        try:
            return json.loads(payload)
        except json.JSONDecodeError:
            return payload.decode(errors="replace")

    def upload(self, path: str, file: Path) -> Any:
        """PUT a file's bytes (streamed from disk, not read into memory first)."""
        with open(file, "rb") as f, self._open(
                "PUT", path, f, content_type="application/octet-stream",
                length=os.fstat(f.fileno()).st_size, timeout_s=UPLOAD_TIMEOUT_S) as resp:
            return json.loads(resp.read() or b"null")

    def stream(self, method: str, path: str, body: Any = None, *,
               timeout_s: float = STREAM_TIMEOUT_S) -> Iterator[dict[str, Any]]:
        """The JSON lines of a streamed answer (one object each); a plain JSON answer
        comes back as its one object."""
        data = json.dumps(body).encode() if body is not None else None
        with self._open(method, path, data, content_type="application/json",
                        accept="application/x-ndjson", timeout_s=timeout_s) as resp:
            if "ndjson" not in resp.headers.get("Content-Type", ""):
                yield dict(json.loads(resp.read()), event="deployment")
                return
            for line in resp:
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


def q(part: str) -> str:
    return urllib.parse.quote(part, safe="")
