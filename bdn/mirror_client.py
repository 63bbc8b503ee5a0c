"""A small synchronous client for the mirror service (``bdn mirror --server``, scripts).

Standard library HTTP only, so the CLI stays light. Transient failures (transport errors,
408/429/5xx) are retried with :mod:`bdn.retry`; a submit carries an ``Idempotency-Key``
so a retried POST cannot start a second job. The API key is sent only in the
``Authorization`` header and never appears in errors.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bdn.errors import AuthError, BdnError, MirrorError
from bdn.retry import (
    RetryableError,
    RetryPolicy,
    is_retryable_status,
    parse_retry_after,
    retry_sync,
)

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_POLL_S = 0.5
API_KEY_ENV = "BDN_MIRROR_API_KEY"
CLIENT_RETRY = RetryPolicy(attempts=5)


class MirrorServiceError(BdnError):
    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MirrorClient:
    url: str
    api_key: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    retry: RetryPolicy = CLIENT_RETRY

    def __repr__(self) -> str:
        return f"MirrorClient({self.url!r})"

    def _request(self, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None, raw: bool = False) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        h = {"Authorization": f"Api-Key {self.api_key}", "Accept": "application/json",
             **(headers or {})}
        if data is not None:
            h["Content-Type"] = "application/json"
        url = self.url.rstrip("/") + path

        def attempt() -> Any:
            req = urllib.request.Request(url, data=data, method=method, headers=h)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    payload = r.read()
                    return payload if raw else json.loads(payload or b"null")
            except urllib.error.HTTPError as e:
                text = e.read().decode(errors="replace")
                try:
                    message = json.loads(text).get("error", text)
                except (ValueError, AttributeError):
                    message = text
                if is_retryable_status(e.code):
                    raise RetryableError(f"HTTP {e.code}: {message}", status=e.code,
                                         retry_after_s=parse_retry_after(
                                             e.headers.get("Retry-After"))) from None
                if e.code in (401, 403):
                    raise AuthError(f"mirror service {self.url}: {message}",
                                    status=e.code) from None
                raise MirrorServiceError(f"mirror service {self.url}: HTTP {e.code}: "
                                         f"{message}", status=e.code) from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                raise RetryableError(f"cannot reach {self.url}: {reason}") from None

        try:
            return retry_sync(attempt, self.retry)
        except RetryableError as e:
            raise MirrorServiceError(f"mirror service {self.url}: {e}", status=e.status) from None

    def submit(self, weights: dict[str, Any], ref: str | None = None, *,
               idempotency_key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"weights": weights}
        if ref is not None:
            body["ref"] = ref
        key = idempotency_key or secrets.token_hex(16)
        return self._request("POST", "/v1/mirrors", body,  # type: ignore[no-any-return]
                             {"Idempotency-Key": key})["job"]

    def get(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/mirrors/{job_id}")["job"]  # type: ignore[no-any-return]

    def list(self, state: str | None = None) -> list[dict[str, Any]]:
        q = f"?state={state}" if state else ""
        return self._request("GET", f"/v1/mirrors{q}")["jobs"]  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request(  # type: ignore[no-any-return]
            "POST", f"/v1/mirrors/{job_id}/cancel")["job"]

    def manifest(self, digest: str) -> bytes:
        return self._request("GET", f"/v1/manifests/{digest}", raw=True)  # type: ignore[no-any-return]

    def ref(self, ref: str) -> str:
        ns, _, rest = ref.partition("/")
        model, _, tag = rest.partition(":")
        doc = self._request("GET", f"/v1/refs/{ns}/{model}/{tag or 'latest'}")
        return str(doc["manifest"])

    def wait(self, job_id: str, *, timeout_s: float | None = None, poll_s: float = DEFAULT_POLL_S,
             on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job is final; raise :class:`MirrorError` unless it succeeded."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                if job["state"] != "succeeded":
                    raise MirrorError(f"mirror job {job_id} {job['state']}: {job.get('error')}")
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise MirrorError(f"mirror job {job_id} still {job['state']} after "
                                  f"{timeout_s}s")
            time.sleep(poll_s)


def mirror_via_server(args: Any, ref: Any) -> int:
    """``bdn mirror SOURCE --ref R --server URL``: submit, wait, print the summary."""
    import os

    from bdn import settings
    from bdn.errors import ConfigError
    from bdn.progress import human_bytes

    api_key = settings.MIRROR_API_KEY.get()
    if not api_key:
        raise ConfigError(f"--server needs an API key in ${API_KEY_ENV}")
    source = args.source if "://" in args.source else "file://" + os.path.abspath(args.source)
    weights: dict[str, Any] = {"source": source}
    if args.allow:
        weights["allow_patterns"] = list(args.allow)
    if args.ignore:
        weights["ignore_patterns"] = list(args.ignore)
    if args.secret:
        weights["auth_secret_name"] = args.secret
    client = MirrorClient(args.server, api_key)
    job = client.submit(weights, str(ref))
    events = args.json or args.events

    def show(j: dict[str, Any]) -> None:
        if args.events:
            print(json.dumps({"event": "job", "id": j["id"], "state": j["state"],
                              "progress": j.get("progress")}), flush=True)

    job = client.wait(job["id"], on_update=show)
    stats = job.get("stats") or {}
    if events:
        print(json.dumps({"event": "summary", "job": job["id"], "manifest": job["manifest"],
                          "ref": job["ref"], "source": job.get("source_pin"), **stats}
                         if args.events else {"job": job["id"], "manifest": job["manifest"],
                                              "ref": job["ref"], "source": job.get("source_pin"),
                                              **stats}), flush=True)
        return 0
    print(f"mirrored {source} → {job['ref']} = {job['manifest']} (job {job['id']})")
    print(f"  {stats.get('files', 0)} files, {human_bytes(stats.get('logical_bytes', 0))} "
          f"logical, {human_bytes(stats.get('bytes_from_origin', 0))} from origin, "
          f"{human_bytes(stats.get('bytes_reused', 0))} reused")
    return 0
