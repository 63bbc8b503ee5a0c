"""The mirror service: ``bdn mirror-server``, an authenticated HTTP API that runs mirror
jobs and remembers them.

Why a service and not only the CLI: users push configs whose ``weights:`` name hf://,
s3:// or gs:// sources; something must copy those into the operator's store once, with
credentials the user never holds, under limits the operator sets, and survive restarts.

API (JSON; every ``/v1`` route needs ``Authorization: Api-Key <key>``: 401 without a
known key, 403 when the key may not use the namespace)::

    POST /v1/mirrors                     {"weights": {...entry...}, "ref"?: "ns/model:tag"}
                                         Idempotency-Key header → 202 {"job": ...}
    GET  /v1/mirrors[?state=]            jobs visible to the key
    GET  /v1/mirrors/{id}                state, files, bytes from origin / reused,
                                         throughput, progress, error
    POST /v1/mirrors/{id}/cancel         → 202 {"job": ...}
    GET  /v1/manifests/{digest}          the manifest's canonical bytes
    GET  /v1/refs/{namespace}/{model}/{tag}
    GET  /healthz                        (no auth)
    GET  /metrics                        Prometheus text (no auth; bdn.metrics)

A job without ``ref`` is stored under :func:`bdn.mirror_key.mirror_ref` of its entry —
the ref the node agent looks for. API keys live in a YAML file as SHA-256 hashes (keys
are random 256-bit tokens, so a fast unsalted hash suffices, as for GitHub tokens) with
the namespaces each may use (``"*"`` for all); ``bdn mirror-keygen`` makes one.

Jobs persist in LMDB (``<state-dir>/jobs.lmdb``). On start, jobs that were queued or
running when the process died are queued again; a rerun skips files whose fingerprints
landed, and resumes partly spooled files from their finished parts. Limits: at most
``max_jobs`` jobs run at once (the rest queue), each fetches at most ``job_concurrency``
ranges in parallel, and all jobs together at most ``max_requests``.

Tenants are isolated. A job's secrets are resolved inside the job from
``<secrets-dir>/<namespace>/`` of the job's own namespace only (a name may carry that
namespace as a prefix, ``team-a/hf``; naming another namespace's secret is a 403 before
any job exists); the folder's top level and the environment hold the operator's own
secrets (``--store-secret``) and are never visible to jobs. Job records hold only secret
*names*, and every error text is scrubbed of secret values before it is stored. A job
reads the service's host (``file://``) only under the operator's ``--allow-local-root``
folders, judged by real path, and no file whose real path leaves them is read. Glob
patterns are validated at submission and matched in linear time (:mod:`bdn.patterns`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets as pysecrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import yaml
from aiohttp import web

from bdn import metrics as prom
from bdn.config import BUCKET_SCHEMES, WeightsEntry, parse_weights
from bdn.errors import BdnError, ConfigError, MirrorError, NotFoundError
from bdn.fsutil import contained_root
from bdn.mirror import Mirror, MirrorOptions
from bdn.mirror_key import mirror_ref
from bdn.secrets import (
    SecretResolver,
    install_log_scrubber,
    scrub,
    secret_namespace,
    store_storage_options,
)
from bdn.sources import open_source
from bdn.sources.local import local_source_path
from bdn.store import BlobStore, StoreOptions
from bdn.transfer.cancel import MirrorCancelled
from bdn.transfer.options import DEFAULT_PART_BYTES, DownloadOptions
from bdn.transfer.spool import SPOOL_PREFIX
from manifests.digest import Digest
from manifests.errors import RefError
from manifests.refs import Ref

log = logging.getLogger(__name__)

API_KEY_SCHEME = "Api-Key"
ALL_NAMESPACES = "*"
DEFAULT_MOUNT = "/weights"
LMDB_MAP_BYTES = 1 << 30
PERSIST_INTERVAL_S = 1.0
STALE_SPOOL_S = 7 * 24 * 3600
MAX_BODY_BYTES = 256 * 1024
MAX_LIST = 1000
STATES_ACTIVE = ("queued", "running")
STATES_ENDED = ("succeeded", "failed", "cancelled")


# -- keys --------------------------------------------------------------------------------


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return "bdn_" + pysecrets.token_urlsafe(32)


def sweep_spool(spool_dir: Path, *, now: float) -> int:
    """Remove spool files left by jobs that will not resume — untouched for
    ``STALE_SPOOL_S`` — with the temporaries of their resume records (``.bdn-spool-…``,
    see :func:`bdn.fsutil.temp_name`); how many went."""
    cutoff = now - STALE_SPOOL_S
    gone = 0
    for pattern in (f"{SPOOL_PREFIX}*", f".{SPOOL_PREFIX}*"):
        for p in spool_dir.glob(pattern):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    gone += 1
    return gone


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    namespaces: frozenset[str]

    def allows(self, namespace: str) -> bool:
        return ALL_NAMESPACES in self.namespaces or namespace in self.namespaces


def load_keys(path: str | Path) -> dict[str, ApiKey]:
    """``{sha256: ApiKey}`` from a YAML file::

        keys:
          - name: ci
            sha256: 3f2a...          # sha256 hex of the key (bdn mirror-keygen prints it)
            namespaces: [team-a]     # or ["*"]
    """
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"API keys file {path}: cannot read: {e}") from None
    items = (doc or {}).get("keys") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f"API keys file {path}: expected a mapping with a 'keys' list")
    out: dict[str, ApiKey] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"API keys file {path}: keys[{i}] must be a mapping")
        digest = str(item.get("sha256", "")).lower()
        ns = item.get("namespaces")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"API keys file {path}: keys[{i}].sha256 must be 64 hex digits")
        if not isinstance(ns, list) or not ns or not all(isinstance(n, str) for n in ns):
            raise ConfigError(f"API keys file {path}: keys[{i}].namespaces must be a "
                              "non-empty list of namespaces (or [\"*\"])")
        out[digest] = ApiKey(str(item.get("name") or f"key{i}"), digest, frozenset(ns))
    return out


# -- options -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceOptions:
    store_url: str
    state_dir: str
    keys_file: str
    secrets_dir: str | None = None
    spool_dir: str | None = None
    store_endpoint_url: str | None = None
    store_secret: str | None = None
    hf_endpoint: str | None = None
    s3_endpoint_url: str | None = None
    gcs_endpoint_url: str | None = None
    max_jobs: int = 2
    max_requests: int = 32
    job_concurrency: int = 8
    write_workers: int = 8
    part_bytes: int = DEFAULT_PART_BYTES
    retry_attempts: int = 6
    # Folders API jobs may mirror from (file://); none by default, so a tenant cannot
    # read the service's host.
    allow_local_roots: tuple[str, ...] = ()
    # Whether API jobs may read buckets (s3://, r2://, gs://) with the service's own
    # credentials (no secret, or a pod-identity auth method). Off by default: those
    # credentials can read the operator's buckets, the store's included.
    allow_ambient_credentials: bool = False

    def __post_init__(self) -> None:
        for root in self.allow_local_roots:
            if not os.path.isabs(root):
                raise ValueError(f"ServiceOptions.allow_local_roots: {root!r} is not an "
                                 "absolute path")
        if not 1 <= self.max_jobs <= 64:
            raise ValueError("ServiceOptions.max_jobs must be in [1, 64]")
        if not 1 <= self.job_concurrency <= self.max_requests <= 1024:
            raise ValueError("ServiceOptions: need 1 ≤ job_concurrency ≤ max_requests ≤ 1024")
        if not 1 <= self.write_workers <= 256:
            raise ValueError("ServiceOptions.write_workers must be in [1, 256]")


# -- job store ---------------------------------------------------------------------------


class JobStore:
    """Job records in LMDB: ``jobs`` (id → JSON), ``idem`` (idempotency → id),
    ``manifests`` (digest → namespaces that produced it)."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path / "jobs.lmdb"), map_size=LMDB_MAP_BYTES, max_dbs=4,
                             subdir=True)
        self.jobs = self.env.open_db(b"jobs")
        self.idem = self.env.open_db(b"idem")
        self.manifests = self.env.open_db(b"manifests")

    def close(self) -> None:
        self.env.close()

    def put(self, job: dict[str, Any]) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(job["id"].encode(), json.dumps(job, sort_keys=True).encode(), db=self.jobs)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.env.begin() as txn:
            raw = txn.get(job_id.encode(), db=self.jobs)
        return json.loads(raw) if raw else None

    def all(self) -> list[dict[str, Any]]:
        with self.env.begin() as txn:
            return [json.loads(v) for _, v in txn.cursor(db=self.jobs)]

    def create(self, job: dict[str, Any], idem_key: str | None, request_hash: str
               ) -> tuple[dict[str, Any], bool]:
        """Store ``job`` unless ``idem_key`` already names one: ``(job, created)``."""
        with self.env.begin(write=True) as txn:
            if idem_key:
                raw = txn.get(idem_key.encode(), db=self.idem)
                if raw:
                    prev_id, prev_hash = json.loads(raw)
                    prev = json.loads(txn.get(prev_id.encode(), db=self.jobs))
                    if prev_hash != request_hash:
                        raise _Conflict("Idempotency-Key was already used with a different "
                                        f"request (job {prev_id})")
                    return prev, False
                txn.put(idem_key.encode(), json.dumps([job["id"], request_hash]).encode(),
                        db=self.idem)
            txn.put(job["id"].encode(), json.dumps(job, sort_keys=True).encode(), db=self.jobs)
        return job, True

    def add_manifest(self, digest: str, namespace: str) -> None:
        with self.env.begin(write=True) as txn:
            raw = txn.get(digest.encode(), db=self.manifests)
            spaces = set(json.loads(raw)) if raw else set()
            spaces.add(namespace)
            txn.put(digest.encode(), json.dumps(sorted(spaces)).encode(), db=self.manifests)

    def manifest_namespaces(self, digest: str) -> set[str]:
        with self.env.begin() as txn:
            raw = txn.get(digest.encode(), db=self.manifests)
        return set(json.loads(raw)) if raw else set()


class _Conflict(Exception):
    pass


# -- live progress -----------------------------------------------------------------------


@dataclass
class _Live:
    """What a running job reports between persists (mutated from the mirror thread)."""

    cancel: threading.Event = field(default_factory=threading.Event)
    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_done: int = 0
    started: float = field(default_factory=time.monotonic)
    source: Any = None

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "listed":
            self.files_total = int(event.get("files", 0))
            self.bytes_total = int(event.get("bytes", 0))
        elif kind == "file":
            self.files_done += 1
        elif kind == "bytes":
            self.bytes_done += int(event.get("n", 0))

    def bytes_from_origin(self) -> int:
        return self.source.counters.bytes_from_origin if self.source is not None else 0

    def progress(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        origin = self.bytes_from_origin()
        return {"files_total": self.files_total, "files_done": self.files_done,
                "bytes_total": self.bytes_total, "bytes_done": self.bytes_done,
                "bytes_from_origin": origin,
                "throughput_bytes_per_s": round(self.bytes_done / elapsed, 1)}


# -- the service -------------------------------------------------------------------------


def _now() -> float:
    return round(time.time(), 3)


class MirrorService:
    def __init__(self, options: ServiceOptions) -> None:
        self.options = options
        self.keys = load_keys(options.keys_file)
        self.secrets = SecretResolver.from_env(options.secrets_dir)
        store_secret = self.secrets.get(options.store_secret) if options.store_secret else None
        self.store = BlobStore(options.store_url, StoreOptions(
            storage_options=store_storage_options(options.store_url,
                                                  endpoint_url=options.store_endpoint_url,
                                                  secret=store_secret)))
        self.jobs = JobStore(Path(options.state_dir))
        self.live: dict[str, _Live] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.slots: asyncio.Semaphore | None = None
        self.request_slots = threading.BoundedSemaphore(options.max_requests)
        self.spool_dir = Path(options.spool_dir or Path(options.state_dir) / "spool")
        self._persist_task: asyncio.Task[None] | None = None
        self._stopping = False
        # /metrics: jobs ended by state, and the bytes of jobs no longer live (a live
        # job's are added at scrape time, then folded in here as it leaves ``live``).
        self.jobs_ended: dict[str, int] = dict.fromkeys(STATES_ENDED, 0)
        self._ended_bytes = 0
        self._ended_origin_bytes = 0
        self.registry = prom.service_registry()
        self.registry.register(prom.StateCollector(self.collect_metrics))

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, app: web.Application) -> None:
        self.slots = asyncio.Semaphore(self.options.max_jobs)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._sweep_spool()
        resumed = 0
        for job in sorted(self.jobs.all(), key=lambda j: j["id"]):
            if job["state"] in STATES_ACTIVE:
                job["state"] = "queued"
                job["resumed"] = True
                self.jobs.put(job)
                self._schedule(job["id"])
                resumed += 1
        if resumed:
            log.info("resuming %d interrupted mirror job(s)", resumed)
        self._persist_task = asyncio.create_task(self._persist_loop())

    async def stop(self, app: web.Application) -> None:
        self._stopping = True
        for live in self.live.values():
            live.cancel.set()
        if self._persist_task:
            self._persist_task.cancel()
        # Running jobs stay "running" in the store: they were interrupted, not cancelled
        # by a user, and resume on the next start.
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.jobs.close()

    def _sweep_spool(self) -> None:
        sweep_spool(self.spool_dir, now=time.time())

    async def _persist_loop(self) -> None:
        while True:
            await asyncio.sleep(PERSIST_INTERVAL_S)
            for job_id, live in list(self.live.items()):
                job = self.jobs.get(job_id)
                if job and job["state"] == "running":
                    job["progress"] = live.progress()
                    await asyncio.to_thread(self.jobs.put, job)

    # -- jobs --------------------------------------------------------------------------

    def _schedule(self, job_id: str) -> None:
        self.tasks[job_id] = asyncio.create_task(self._run(job_id))

    async def _run(self, job_id: str) -> None:
        assert self.slots is not None
        try:
            async with self.slots:
                job = self.jobs.get(job_id)
                if job is None or job["state"] != "queued":
                    return
                live = _Live()
                self.live[job_id] = live
                job.update(state="running", started_at=_now(),
                           attempts=int(job.get("attempts", 0)) + 1, error=None)
                self.jobs.put(job)
                try:
                    result = await asyncio.to_thread(self._mirror, job, live)
                except asyncio.CancelledError:
                    live.cancel.set()
                    raise
                except MirrorCancelled:
                    if self._stopping:
                        return  # interrupted by shutdown: stays "running", resumes later
                    self._finish(job_id, live, state="cancelled", error="cancelled by request")
                except BdnError as e:
                    self._finish(job_id, live, state="failed", error=scrub(str(e)))
                except Exception as e:  # a bug, not a user error: keep the service up
                    log.exception("mirror job %s crashed", job_id)
                    self._finish(job_id, live, state="failed",
                                 error=f"internal error: {type(e).__name__}: {scrub(str(e))}")
                else:
                    self._finish(job_id, live, state="succeeded", result=result)
        finally:
            ended = self.live.pop(job_id, None)
            if ended is not None:
                self._ended_bytes += ended.bytes_done
                self._ended_origin_bytes += ended.bytes_from_origin()
            self.tasks.pop(job_id, None)

    def _finish(self, job_id: str, live: _Live, *, state: str, error: str | None = None,
                result: dict[str, Any] | None = None) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        if state == "failed" and live.cancel.is_set() and job.get("cancel_requested"):
            state, error = "cancelled", "cancelled by request"
        job.update(state=state, finished_at=_now(), error=error, progress=live.progress())
        self.jobs_ended[state] = self.jobs_ended.get(state, 0) + 1
        if result is not None:
            job["manifest"] = result["manifest"]
            job["source_pin"] = result["source"]
            stats = {k: v for k, v in result.items() if k not in ("manifest", "ref", "source")}
            secs = stats.get("seconds") or 0.0
            stats["throughput_bytes_per_s"] = round(stats["logical_bytes"] / secs, 1) \
                if secs else None
            job["stats"] = stats
            self.jobs.add_manifest(result["manifest"], job["namespace"])
        self.jobs.put(job)
        log.info("mirror job %s %s%s", job_id, state, f": {error}" if error else "")

    def _mirror(self, job: dict[str, Any], live: _Live) -> dict[str, Any]:
        """Runs in a worker thread."""
        entry = _parse_entry(job["entry"])
        o = self.options
        from bdn.retry import RetryPolicy

        download = DownloadOptions(part_bytes=o.part_bytes, concurrency=o.job_concurrency,
                                   retry=RetryPolicy(attempts=o.retry_attempts))
        refusal = self._tenancy_refusal(entry, job["namespace"])
        if refusal is not None:  # the allow-list may have shrunk since it was queued
            raise MirrorError(refusal)
        local: dict[str, Any] = {}
        if entry.source.scheme == "file":
            local["allowed_roots"] = self._local_roots()
        source = open_source(entry.source, secrets=self.secrets.for_namespace(job["namespace"]),
                             auth=entry.auth, download=download, cancel=live.cancel, **local,
                             request_slots=self.request_slots, hf_endpoint=o.hf_endpoint,
                             s3_endpoint_url=o.s3_endpoint_url,
                             gcs_endpoint_url=o.gcs_endpoint_url)
        live.source = source
        try:
            mirror = Mirror(self.store, MirrorOptions(write_workers=o.write_workers,
                                                      spool_dir=str(self.spool_dir)))
            result = mirror.run(source, ref=Ref.parse(job["ref"]),
                                allow=entry.allow_patterns, ignore=entry.ignore_patterns,
                                progress=live.on_event, cancel=live.cancel)
        finally:
            source.close()
        return result.to_dict()

    def view(self, job: dict[str, Any]) -> dict[str, Any]:
        out = dict(job)
        live = self.live.get(job["id"])
        if live is not None and job["state"] == "running":
            out["progress"] = live.progress()
        return out

    # -- HTTP --------------------------------------------------------------------------

    @web.middleware
    async def auth_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/v1/"):
            return await handler(request)  # type: ignore[no-any-return]
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme != API_KEY_SCHEME or not key.strip():
            return _json_error(401, "missing API key: send 'Authorization: Api-Key <key>'",
                               {"WWW-Authenticate": API_KEY_SCHEME})
        api_key = self.keys.get(hash_key(key.strip()))
        if api_key is None:
            return _json_error(401, "unknown API key", {"WWW-Authenticate": API_KEY_SCHEME})
        request["api_key"] = api_key
        return await handler(request)  # type: ignore[no-any-return]

    async def post_mirror(self, request: web.Request) -> web.Response:
        key: ApiKey = request["api_key"]
        raw = await request.read()
        if len(raw) > MAX_BODY_BYTES:
            return _json_error(413, "request body too large")
        try:
            body = json.loads(raw or b"null")
        except (ValueError, RecursionError):
            return _json_error(400, "request body is not JSON (or is nested too deeply)")
        if not isinstance(body, dict) or not isinstance(body.get("weights"), dict):
            return _json_error(400, "body must be {\"weights\": {...entry...}, \"ref\"?: ...}")
        unknown = set(body) - {"weights", "ref"}
        if unknown:
            return _json_error(400, f"unknown field(s): {', '.join(sorted(unknown))}")
        try:
            entry = _parse_entry(body["weights"])
            ref = Ref.parse(body["ref"]) if body.get("ref") is not None else mirror_ref(entry)
        except (ConfigError, RefError) as e:
            return _json_error(400, str(e))
        if not key.allows(ref.namespace):
            return _json_error(403, f"API key {key.name!r} may not write namespace "
                                    f"{ref.namespace!r}")
        refusal = self._tenancy_refusal(entry, ref.namespace)
        if refusal is not None:
            return _json_error(403, refusal)
        weights = dict(entry.to_dict())
        weights.pop("mount_location", None)
        request_doc = {"weights": weights, "ref": str(ref)}
        request_hash = hashlib.sha256(json.dumps(request_doc, sort_keys=True).encode()
                                      ).hexdigest()
        idem = request.headers.get("Idempotency-Key")
        idem_key = hash_key(f"{key.sha256}:{idem}") if idem else None
        job_id = f"{int(time.time() * 1000):012x}{pysecrets.token_hex(4)}"
        job = {"id": job_id, "state": "queued", "namespace": ref.namespace, "ref": str(ref),
               "entry": weights, "created_at": _now(), "started_at": None,
               "finished_at": None, "attempts": 0, "error": None, "manifest": None,
               "stats": None, "progress": None, "submitted_by": key.name}
        try:
            job, created = self.jobs.create(job, idem_key, request_hash)
        except _Conflict as e:
            return _json_error(409, str(e))
        if created:
            self._schedule(job_id)
        return web.json_response({"job": self.view(job)}, status=202 if created else 200,
                                 headers={"Location": f"/v1/mirrors/{job['id']}"})

    def _local_roots(self) -> tuple[str, ...]:
        return tuple(os.path.realpath(r) for r in self.options.allow_local_roots)

    def _tenancy_refusal(self, entry: WeightsEntry, namespace: str) -> str | None:
        """Why a job in ``namespace`` may not run ``entry`` (a 403), or None.

        A job may read the host only under the operator's ``--allow-local-root`` folders
        (the real path is checked, so neither ``..`` nor a symlink leaves them), may read
        a bucket only with a secret (the service's own credentials only where the
        operator allowed them), and may name only its own namespace's secrets."""
        if entry.source.scheme == "file":
            if not self.options.allow_local_roots:
                return ("local sources (file://) are not allowed for API jobs; the operator "
                        "can allow folders with --allow-local-root")
            if contained_root(local_source_path(entry.source), self._local_roots()) is None:
                return (f"source {entry.source.uri!r} is not inside a folder the operator "
                        "allowed (--allow-local-root)")
        if (entry.source.scheme in BUCKET_SCHEMES and not self.options.allow_ambient_credentials
                and (entry.auth is None or entry.auth.auth_method != "CUSTOM_SECRET")):
            return (f"source {entry.source.uri!r}: a bucket is read only with a secret of the "
                    "job's namespace (auth_secret_name); the service's own credentials are "
                    "not lent to jobs unless the operator starts it with "
                    "--allow-ambient-credentials")
        name = entry.secret_name
        owner = secret_namespace(name) if name else None
        if owner is not None and owner != namespace:
            return (f"secret {name!r} belongs to namespace {owner!r}; a job in namespace "
                    f"{namespace!r} may only use its own secrets")
        return None

    def _visible_job(self, request: web.Request) -> dict[str, Any] | web.Response:
        key: ApiKey = request["api_key"]
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return _json_error(404, f"no mirror job {request.match_info['id']!r}")
        if not key.allows(job["namespace"]):
            return _json_error(403, f"API key {key.name!r} may not read namespace "
                                    f"{job['namespace']!r}")
        return job

    async def get_mirror(self, request: web.Request) -> web.Response:
        job = self._visible_job(request)
        if isinstance(job, web.Response):
            return job
        return web.json_response({"job": self.view(job)})

    async def list_mirrors(self, request: web.Request) -> web.Response:
        key: ApiKey = request["api_key"]
        state = request.query.get("state")
        jobs = [self.view(j) for j in sorted(self.jobs.all(), key=lambda j: j["id"])
                if key.allows(j["namespace"]) and (state is None or j["state"] == state)]
        return web.json_response({"jobs": jobs[-MAX_LIST:]})

    async def cancel_mirror(self, request: web.Request) -> web.Response:
        job = self._visible_job(request)
        if isinstance(job, web.Response):
            return job
        if job["state"] in STATES_ACTIVE:
            job["cancel_requested"] = True
            live = self.live.get(job["id"])
            if live is not None:
                live.cancel.set()
            if job["state"] == "queued":
                job.update(state="cancelled", finished_at=_now(), error="cancelled by request")
            self.jobs.put(job)
        return web.json_response({"job": self.view(job)}, status=202)

    async def get_manifest(self, request: web.Request) -> web.Response:
        key: ApiKey = request["api_key"]
        try:
            digest = Digest.parse(request.match_info["digest"])
        except ValueError:
            return _json_error(400, "not a manifest digest (b3:<64 hex>)")
        visible = ALL_NAMESPACES in key.namespaces or \
            any(key.allows(ns) for ns in self.jobs.manifest_namespaces(str(digest)))
        if not visible:
            return _json_error(404, f"manifest {digest} not found")
        try:
            data = await asyncio.to_thread(self.store.get_manifest_bytes, digest)
        except NotFoundError:
            return _json_error(404, f"manifest {digest} not found")
        return web.Response(body=data, content_type="application/json")

    async def get_ref(self, request: web.Request) -> web.Response:
        key: ApiKey = request["api_key"]
        try:
            ref = Ref(request.match_info["namespace"], request.match_info["model"],
                      request.match_info["tag"])
        except RefError as e:
            return _json_error(400, str(e))
        if not key.allows(ref.namespace):
            return _json_error(403, f"API key {key.name!r} may not read namespace "
                                    f"{ref.namespace!r}")
        try:
            digest = await asyncio.to_thread(self.store.get_ref, ref)
        except NotFoundError:
            return _json_error(404, f"ref {ref} not found")
        return web.json_response({"ref": str(ref), "manifest": str(digest)})

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True, "running": len(self.live)})

    def collect_metrics(self) -> Iterator[prom.Metric]:
        """The service's families (``/metrics``), from the jobs this process runs."""
        live = list(self.live.values())
        yield prom.gauge("bdn_mirror_jobs_running", "Mirror jobs running now.",
                         value=len(live))
        yield prom.gauge("bdn_mirror_jobs_queued",
                         "Mirror jobs waiting for a slot (at most --max-jobs run at once).",
                         value=max(0, len(self.tasks) - len(live)))
        yield prom.counter("bdn_mirror_jobs_ended_total",
                           "Mirror jobs this process ran to an end, by state.",
                           [({"state": st}, n) for st, n in sorted(self.jobs_ended.items())])
        yield prom.counter("bdn_mirror_bytes_total",
                           "Bytes of files mirrored into the store (fetched or reused).",
                           value=self._ended_bytes + sum(v.bytes_done for v in live))
        yield prom.counter("bdn_mirror_origin_bytes_total",
                           "Bytes read from the sources (the origin).",
                           value=self._ended_origin_bytes
                           + sum(v.bytes_from_origin() for v in live))

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth_middleware],
                              client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/mirrors", self.post_mirror)
        app.router.add_get("/v1/mirrors", self.list_mirrors)
        app.router.add_get("/v1/mirrors/{id}", self.get_mirror)
        app.router.add_post("/v1/mirrors/{id}/cancel", self.cancel_mirror)
        app.router.add_get("/v1/manifests/{digest}", self.get_manifest)
        app.router.add_get("/v1/refs/{namespace}/{model}/{tag}", self.get_ref)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", prom.metrics_handler(self.registry))
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        return app


def _parse_entry(doc: dict[str, Any]) -> WeightsEntry:
    return parse_weights([{"mount_location": DEFAULT_MOUNT, **doc}])[0]


def _json_error(status: int, message: str,
                headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": scrub(message)}, status=status, headers=headers)


def run_server(options: ServiceOptions, listen: str) -> int:
    from bdn.service import ListenAddress, serve_forever

    install_log_scrubber()
    os.makedirs(options.state_dir, exist_ok=True)

    async def make_app() -> web.Application:
        return MirrorService(options).make_app()

    return serve_forever(make_app, ListenAddress.parse(listen))
