"""A small synchronous client for the mirror service (``bdn mirror --server``, scripts).

Over :mod:`bdn.httpclient`, so the CLI stays light. Transient failures (transport errors,
408/429/5xx) are retried with :mod:`bdn.retry`'s policy; a submit carries an
``Idempotency-Key`` so a retried POST cannot start a second job, and a cancel is
idempotent by nature. The API key is sent only in the ``Authorization`` header and never
appears in errors.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bdn.errors import AuthError, BdnError, MirrorError
from bdn.httpclient import ErrorMap, Failure, HttpClient
from bdn.retry import RetryPolicy

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_POLL_S = 0.5
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

    @functools.cached_property
    def _http(self) -> HttpClient:
        def refused(f: Failure) -> AuthError:
            return AuthError(f"mirror service {self.url}: {f.message}", status=f.status)

        def failed(f: Failure) -> MirrorServiceError:
            return MirrorServiceError(f"mirror service {self.url}: HTTP {f.status}: "
                                      f"{f.message}", status=f.status)

        def unreached(f: Failure) -> MirrorServiceError:
            return MirrorServiceError(f"mirror service {self.url}: cannot reach {self.url}: "
                                      f"{f.message}")

        return HttpClient(self.url, timeout_s=self.timeout_s, retry=self.retry,
                          headers={"Authorization": f"Api-Key {self.api_key}",
                                   "Accept": "application/json"},
                          errors=ErrorMap(statuses={401: refused, 403: refused},
                                          other=failed, unavailable=unreached))

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None, raw: bool = False,
                 idempotent: bool | None = None) -> Any:
        payload = self._http.request(method, path, json_body=body, headers=headers,
                                     idempotent=idempotent).body
        return payload if raw else json.loads(payload or b"null")

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
            "POST", f"/v1/mirrors/{job_id}/cancel", idempotent=True)["job"]

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
        raise ConfigError(f"--server needs an API key in ${settings.MIRROR_API_KEY.name}")
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
