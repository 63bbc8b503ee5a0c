"""The control server's HTTP app: the management API, the router, metrics, API keys.

Management paths and JSON fields are Baseten's (``/v1/models/{model_id}/deployments/
{deployment_id}/autoscaling_settings``, ``.../environments/{env_name}/promote``, ...), so
clients written for that API need only a different base URL. Where Baseten takes a
Truss archive, ``bdn push`` sends the folder's files by content: ``POST
/v1/uploads/missing`` (which BLAKE3 digests the server lacks), ``PUT
/v1/uploads/{digest}`` (each missing file), then ``POST
/v1/models/{model_id}/deployments`` with ``files`` (see ``control.push``; the answer
streams the mirror's progress as JSON lines when asked). A ``model_dir`` the server can
read is still accepted there and runs in place, without the agent (tests, operators).
``production`` and ``development`` work wherever a deployment id does, as in Baseten's
paths. Environments carry ``promotion_settings`` (rolling deployments, the cleanup
strategy; ``control.promotion_settings``) and show ``in_progress_promotion`` with the
documented statuses; ``POST .../environments/{env}/{pause,resume,cancel,force_cancel,
force_roll_forward}_promotion`` control a promotion (``control.rollout``'s action table).

Every ``/v1/`` and inference path needs ``Authorization: Api-Key <key>``; ``/metrics``
and ``/health/*`` do not, so Prometheus and probes need no secret. Keys are compared in
constant time and never logged. Errors are JSON ``{"error": "...", "status": N}`` whose
sentence names the field, deployment or environment involved.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from bdn import metrics as prom
from bdn.errors import BdnError
from bdn.secrets import SecretResolver
from bdn.store import BlobStore, default_store_url
from control.backends import (
    LocalBackendOptions,
    LocalProcessBackend,
    ReplicaBackend,
)
from control.chains import ChainsApi
from control.controller import Controller, ControllerOptions, Runtime, resources_of
from control.delivery import AgentDelivery, EmbeddedAgent
from control.errors import ControlError, NotFoundError, RequestError
from control.metrics import Metrics
from control.promotion_settings import PromotionSettings
from control.push import MAX_UPLOAD_BYTES, Pushes, parse_files
from control.resources import instance_type_for
from control.rollout import ACTIONS_BY_PATH, Status, in_progress_promotion_json
from control.router import Router, error_response
from control.settings import AutoscalingSettings
from control.store import DEVELOPMENT, PRODUCTION, DeploymentRecord, EnvironmentRecord, Store

log = logging.getLogger(__name__)

API_KEY_FILE_NAME = "api-key"
STATE_FILE_NAME = "control.sqlite3"
AUTH_SCHEME = "Api-Key"
OPEN_PATHS = ("/metrics", "/health/")


@dataclass(frozen=True)
class ServerOptions:
    """Everything a control server needs; validated on construction."""

    state_dir: Path
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    controller: ControllerOptions = field(default_factory=ControllerOptions)
    backend: LocalBackendOptions = field(default_factory=LocalBackendOptions)
    # Where pushed models and their weights are stored (default: bdn.store's default).
    store_url: str | None = None
    # The node agent that delivers pushed models: an address (unix:PATH, http://...),
    # or None to run one as a child of this server (the one-machine default).
    agent: str | None = None
    # Cluster cache pods the embedded agent reads through (none: the store directly).
    cache_peers: tuple[str, ...] = ()
    # Secrets pushed configs declare are read here (then BDN_SECRET_<NAME>).
    secrets_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.api_keys:
            raise RequestError("at least one API key is required", field="api_keys")
        for key in self.api_keys:
            if len(key) < 8 or any(c.isspace() for c in key):
                raise RequestError("an API key must be at least 8 characters without "
                                   "whitespace", field="api_keys")


def load_or_create_api_keys(state_dir: Path, key_file: Path | None,
                            env_key: str | None) -> tuple[tuple[str, ...], str]:
    """The server's API keys and where they came from (never the keys themselves).

    Order: ``--api-key-file`` (one key per line), ``BDN_API_KEY``, else a key generated
    once into ``STATE_DIR/api-key`` (mode 0600) and reused on later starts.
    """
    if key_file is not None:
        keys = tuple(k.strip() for k in key_file.read_text().splitlines() if k.strip())
        return keys, str(key_file)
    if env_key:
        return (env_key,), "BDN_API_KEY"
    path = state_dir / API_KEY_FILE_NAME
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return (path.read_text().strip(),), str(path)


async def json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object")
    return data


def check_resources(model_dir: str) -> str:
    """Validate a model folder's ``resources:`` at push (a 400 naming the field, e.g.
    ``resources.accelerator``); its instance type's name. Pushed folders are checked
    the same way in control.push, before their weights are mirrored."""
    from bdn.config import read_config_document

    try:
        doc = read_config_document(model_dir)
    except BdnError as e:
        raise RequestError(f"config.yaml could not be read: {e}", field="model_dir") from None
    data = doc.get("resources") if isinstance(doc, dict) else None
    return instance_type_for(data or None).name


def instance_type_name(resources: Mapping[str, Any] | None) -> str | None:
    """``instance_type_name`` of the deployment JSON (None if the spec became invalid)."""
    try:
        return instance_type_for(resources).name
    except RequestError:
        return None


def bool_field(data: Mapping[str, Any], name: str, default: bool) -> bool:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"must be true or false, got {value!r}", field=name)
    return value


def str_field(data: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise RequestError("is required", field=name)
        return None
    if not isinstance(value, str) or not value:
        raise RequestError(f"must be a non-empty string, got {value!r}", field=name)
    return value


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ManagementApi:
    def __init__(self, controller: Controller, pushes: Pushes | None = None) -> None:
        self.c = controller
        self.store = controller.store
        self.pushes = pushes

    # -- JSON views --------------------------------------------------------------------

    def deployment_json(self, rec: DeploymentRecord) -> dict[str, Any]:
        rt: Runtime | None = self.c.runtimes.get(rec.id)
        envs = self.store.environments_of(rec.id)
        return {
            "id": rec.id,
            "created_at": rec.created_at,
            "name": rec.name,
            "model_id": rec.model_id,
            "is_production": PRODUCTION in envs,
            "is_development": rec.is_development,
            "status": self.c.status_of(rt) if rt else ("ACTIVE" if rec.active else "INACTIVE"),
            "active_replica_count": len(rt.ready) if rt else 0,
            "autoscaling_settings": rec.settings.to_json(),
            "instance_type_name": instance_type_name(resources_of(rec)),
            "environment": envs[0] if envs else None,
            # bdn's additions: the live picture the autoscaler works from.
            "model_dir": rec.model_dir,
            "code_manifest": rec.push["code"] if rec.push else None,
            "weights": [{"source": w.get("source"), "manifest": w.get("ref"),
                         "mount_location": w.get("mount_location")}
                        for w in (rec.push or {}).get("weights", [])],
            "desired_replica_count": rt.desired if rt else 0,
            "starting_replica_count": len(rt.starting) if rt else 0,
            "stopping_replica_count": len(rt.draining) if rt else 0,
            "in_flight_requests": rt.in_flight if rt else 0,
            "queued_requests": rt.queued if rt else 0,
            "waiting_requests": rt.waiting if rt else 0,
            "cold_start_seconds": [round(s, 3) for s in rt.cold_starts_s[-10:]] if rt else [],
            "last_error": rt.last_error if rt else None,
            "last_cold_start": rt.last_cold_start.to_json()
            if rt and rt.last_cold_start else None,
            "replicas": self.replicas_json(rt),
        }

    def replicas_json(self, rt: Runtime | None) -> list[dict[str, Any]]:
        """Every replica the controller knows of, with its cold-start record."""
        if rt is None:
            return []
        out: list[dict[str, Any]] = [
            {"id": r.id, "state": "ready", "url": r.url, "pid": r.pid,
             "in_flight": r.in_flight, "revision": r.spec.revision,
             "cold_start_seconds": round(r.cold_start_s, 3),
             "cold_start": r.cold_start.to_json()} for r in rt.ready]
        out += [{"id": r.id, "state": "draining", "url": r.url, "pid": r.pid,
                 "in_flight": r.in_flight, "revision": r.spec.revision,
                 "cold_start_seconds": round(r.cold_start_s, 3),
                 "cold_start": r.cold_start.to_json()} for r in rt.held.values()]
        out += [{"id": s.id, "state": "starting", "url": s.url or None, "pid": s.pid,
                 "in_flight": 0, "revision": s.revision, "cold_start_seconds": None,
                 "cold_start": None} for s in rt.starting.values()]
        return out

    def model_json(self, model_id: str) -> dict[str, Any]:
        m = self.store.get_model(model_id)
        deps = self.store.list_deployments(model_id)
        dev = next((d.id for d in deps if d.is_development), None)
        return {"id": m.id, "created_at": m.created_at, "name": m.name,
                "deployments_count": len(deps),
                "production_deployment_id":
                    self.store.get_environment(model_id, PRODUCTION).current_deployment_id,
                "development_deployment_id": dev, "instance_type_name": None}

    def promotion_json(self, env: EnvironmentRecord) -> dict[str, Any] | None:
        """``in_progress_promotion``: the documented ``status`` and
        ``percent_traffic_to_new_version``, and bdn's detail. The last promotion stays
        shown, with its terminal status, until the next one starts."""
        promo = self.c.promotions.get((env.model_id, env.name))
        if promo is None:
            return None
        rt = self.c.runtimes.get(promo.deployment_id)
        out: dict[str, Any] = {
            "deployment_id": promo.deployment_id,
            "previous_deployment_id": promo.previous_id,
            "rolling": promo.rolling,
            "status": promo.status.value,
            "percent_traffic_to_new_version":
                100.0 if promo.status is Status.SUCCEEDED else 0.0,
            "error": promo.error,
            "cleanup": promo.cleanup,
            "ready_replicas": len(rt.ready) if rt else 0,
            # A plain promotion's candidate needs one ready replica even at min_replica 0.
            "needed_replicas": max(1, rt.record.settings.min_replica) if rt else None,
        }
        if promo.plan is not None:
            out.update(in_progress_promotion_json(promo.plan))
            out["needed_replicas"] = promo.plan.candidate_replicas
        return out

    def environment_json(self, env: EnvironmentRecord) -> dict[str, Any]:
        current = (self.store.get_deployment(env.model_id, env.current_deployment_id)
                   if env.current_deployment_id else None)
        return {"name": env.name, "created_at": env.created_at, "model_id": env.model_id,
                "current_deployment": self.deployment_json(current) if current else None,
                "autoscaling_settings": env.settings.to_json(),
                "promotion_settings": env.promotion_settings.to_json(),
                "previous_deployment_id": env.previous_deployment_id,
                "in_progress_promotion": self.promotion_json(env)}

    def resolve(self, model_id: str, deployment_id: str) -> DeploymentRecord:
        self.store.get_model(model_id)
        if deployment_id == PRODUCTION:
            current = self.store.get_environment(model_id, PRODUCTION).current_deployment_id
            if current is None:
                raise NotFoundError(f"model {model_id} has no production deployment yet",
                                    kind="deployment", ident=PRODUCTION)
            deployment_id = current
        elif deployment_id == DEVELOPMENT:
            return self.store.development_deployment(model_id)
        return self.store.get_deployment(model_id, deployment_id)

    # -- routes ------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/models", self.list_models)
        r.add_post("/v1/uploads/missing", self.uploads_missing)
        r.add_put("/v1/uploads/{digest}", self.put_upload)
        r.add_post("/v1/models", self.create_model)
        r.add_get("/v1/models/{model_id}", self.get_model)
        r.add_delete("/v1/models/{model_id}", self.delete_model)
        r.add_get("/v1/models/{model_id}/deployments", self.list_deployments)
        r.add_post("/v1/models/{model_id}/deployments", self.create_deployment)
        r.add_get("/v1/models/{model_id}/deployments/{deployment_id}", self.get_deployment)
        r.add_patch("/v1/models/{model_id}/deployments/{deployment_id}",
                    self.patch_deployment)
        r.add_get("/v1/models/{model_id}/deployments/{deployment_id}/replicas",
                  self.get_replicas)
        r.add_delete("/v1/models/{model_id}/deployments/{deployment_id}",
                     self.delete_deployment)
        r.add_patch("/v1/models/{model_id}/deployments/{deployment_id}/autoscaling_settings",
                    self.patch_autoscaling)
        r.add_post("/v1/models/{model_id}/deployments/{deployment_id}/activate", self.activate)
        r.add_post("/v1/models/{model_id}/deployments/{deployment_id}/deactivate",
                   self.deactivate)
        r.add_post("/v1/models/{model_id}/deployments/{deployment_id}/promote",
                   self.promote_to_production)
        r.add_get("/v1/models/{model_id}/environments", self.list_environments)
        r.add_post("/v1/models/{model_id}/environments", self.create_environment)
        r.add_get("/v1/models/{model_id}/environments/{env_name}", self.get_environment)
        r.add_patch("/v1/models/{model_id}/environments/{env_name}", self.patch_environment)
        r.add_delete("/v1/models/{model_id}/environments/{env_name}",
                     self.delete_environment)
        r.add_post("/v1/models/{model_id}/environments/{env_name}/promote",
                   self.promote_to_environment)
        for path in ACTIONS_BY_PATH:
            r.add_post(f"/v1/models/{{model_id}}/environments/{{env_name}}/{path}",
                       self.promotion_action)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"models": [self.model_json(m.id) for m in self.store.list_models()]})

    async def create_model(self, request: web.Request) -> web.Response:
        data = await json_body(request)
        name = str_field(data, "name", required=True)
        assert name is not None
        rec = self.store.create_model(name)
        return web.json_response(self.model_json(rec.id), status=201)

    async def get_model(self, request: web.Request) -> web.Response:
        return web.json_response(self.model_json(request.match_info["model_id"]))

    async def delete_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        await self.c.delete_model(model_id)
        return web.json_response({"id": model_id, "deleted": True})

    async def list_deployments(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        self.store.get_model(model_id)
        return web.json_response({"deployments": [
            self.deployment_json(d) for d in self.store.list_deployments(model_id)]})

    async def uploads_missing(self, request: web.Request) -> web.Response:
        pushes = self._pushes()
        data = await json_body(request)
        digests = data.get("digests")
        if not isinstance(digests, list):
            raise RequestError("must be a list of BLAKE3 hex digests", field="digests")
        return web.json_response({"missing": pushes.missing(digests)})

    async def put_upload(self, request: web.Request) -> web.Response:
        import blake3

        pushes = self._pushes()
        digest = request.match_info["digest"]
        tmp, final = pushes.upload_target(digest)
        h = blake3.blake3()
        size = 0
        try:
            with open(tmp, "xb") as f:
                async for block in request.content.iter_chunked(1 << 20):
                    size += len(block)
                    if size > MAX_UPLOAD_BYTES:
                        raise RequestError(
                            f"a pushed file may be at most {MAX_UPLOAD_BYTES} bytes; put "
                            "weights in config.yaml's weights: (mirrored, not uploaded)",
                            field="digest")
                    h.update(block)
                    f.write(block)
            pushes.finish_upload(tmp, final, h.hexdigest(), digest)
        finally:
            tmp.unlink(missing_ok=True)
        return web.json_response({"digest": digest}, status=201)

    def _pushes(self) -> Pushes:
        if self.pushes is None:
            raise RequestError("this control server takes no pushed folders (no store)",
                               field="files")
        return self.pushes

    async def create_deployment(self, request: web.Request) -> web.StreamResponse:
        model_id = request.match_info["model_id"]
        data = await json_body(request)
        self.store.get_model(model_id)
        if data.get("files") is not None:
            return await self._push_files(request, model_id, data)
        model_dir = str_field(data, "model_dir", required=True)
        assert model_dir is not None
        if not os.path.isabs(model_dir):
            raise RequestError(f"must be an absolute path on the server, got {model_dir!r}",
                               field="model_dir")
        if not os.path.isfile(os.path.join(model_dir, "config.yaml")):
            raise RequestError(f"{model_dir} has no config.yaml", field="model_dir")
        check_resources(model_dir)
        raw = data.get("autoscaling_settings")
        settings = AutoscalingSettings.from_json(raw) if raw is not None else None
        rec = self.c.push(model_id, model_dir, name=str_field(data, "name", required=False),
                          development=bool_field(data, "development", False),
                          settings=settings)
        return web.json_response(self.deployment_json(rec), status=201)

    async def _push_files(self, request: web.Request, model_id: str,
                          data: dict[str, Any]) -> web.StreamResponse:
        """A pushed folder: mirror code and weights, then create the deployment.

        With ``Accept: application/x-ndjson`` the answer streams the mirror's progress
        as JSON lines and ends with ``{"event": "deployment", ...}`` (or ``"error"``).
        """
        import asyncio

        pushes = self._pushes()
        files = parse_files(data.get("files"))
        raw = data.get("autoscaling_settings")
        settings = AutoscalingSettings.from_json(raw) if raw is not None else None
        name = str_field(data, "name", required=False)
        development = bool_field(data, "development", False)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def progress(event: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        streaming = "application/x-ndjson" in request.headers.get("Accept", "")
        job = asyncio.ensure_future(asyncio.to_thread(
            pushes.push, files, progress if streaming else None))
        if not streaming:
            record = await job
            rec = self.c.push(model_id, record.code, name=name, development=development,
                              settings=settings, push=record.to_json())
            return web.json_response(self.deployment_json(rec), status=201)
        resp = web.StreamResponse(status=201, headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        job.add_done_callback(lambda _f: events.put_nowait(None))
        while (event := await events.get()) is not None:
            await resp.write((json.dumps(event) + "\n").encode())
        try:
            record = job.result()
            rec = self.c.push(model_id, record.code, name=name, development=development,
                              settings=settings, push=record.to_json())
            final = {"event": "deployment", **self.deployment_json(rec)}
        except ControlError as e:
            final = {"event": "error", "error": str(e), "status": e.status}
        except BdnError as e:
            final = {"event": "error", "error": str(e), "status": 400}
        await resp.write((json.dumps(final) + "\n").encode())
        await resp.write_eof()
        return resp

    async def get_deployment(self, request: web.Request) -> web.Response:
        rec = self.resolve(request.match_info["model_id"], request.match_info["deployment_id"])
        return web.json_response(self.deployment_json(rec))

    async def patch_deployment(self, request: web.Request) -> web.Response:
        """Rename a deployment (the only field a deployment's PATCH takes); names are
        cosmetic, as documented: paths keep using the id."""
        model_id = request.match_info["model_id"]
        rec = self.resolve(model_id, request.match_info["deployment_id"])
        data = await json_body(request)
        unknown = set(data) - {"name"}
        if unknown:
            raise RequestError("is not a deployment field that can be changed (only name)",
                               field=sorted(unknown)[0])
        if "name" not in data:
            raise RequestError("is required", field="name")
        renamed = self.c.rename(model_id, rec.id, data["name"])
        return web.json_response(self.deployment_json(renamed))

    async def get_replicas(self, request: web.Request) -> web.Response:
        rec = self.resolve(request.match_info["model_id"], request.match_info["deployment_id"])
        return web.json_response({"replicas": self.replicas_json(self.c.runtimes.get(rec.id))})

    async def delete_deployment(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        rec = self.resolve(model_id, request.match_info["deployment_id"])
        await self.c.delete_deployment(model_id, rec.id)
        return web.json_response({"id": rec.id, "deleted": True})

    async def patch_autoscaling(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        rec = self.resolve(model_id, request.match_info["deployment_id"])
        status, after = self.c.update_settings(model_id, rec.id, await json_body(request))
        message = ("autoscaling settings unchanged" if status == "UNCHANGED"
                   else f"autoscaling settings of deployment {after.id} updated")
        return web.json_response({"status": status, "message": message,
                                  "autoscaling_settings": after.settings.to_json()})

    async def activate(self, request: web.Request) -> web.Response:
        return self._set_active(request, True)

    async def deactivate(self, request: web.Request) -> web.Response:
        return self._set_active(request, False)

    def _set_active(self, request: web.Request, active: bool) -> web.Response:
        model_id = request.match_info["model_id"]
        rec = self.resolve(model_id, request.match_info["deployment_id"])
        self.c.set_active(model_id, rec.id, active)
        return web.json_response({"success": True})

    async def promote_to_production(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        rec = self.resolve(model_id, request.match_info["deployment_id"])
        data = await json_body(request)
        promoted = self.c.promote(
            model_id, PRODUCTION, rec.id,
            scale_down_previous=bool_field(data, "scale_down_previous_production", True))
        return web.json_response(self.deployment_json(promoted))

    async def promote_to_environment(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        env_name = request.match_info["env_name"]
        data = await json_body(request)
        dep = str_field(data, "deployment_id", required=True)
        assert dep is not None
        rec = self.resolve(model_id, dep)
        promoted = self.c.promote(
            model_id, env_name, rec.id,
            scale_down_previous=bool_field(data, "scale_down_previous_deployment", True))
        return web.json_response(self.deployment_json(promoted))

    async def list_environments(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        self.store.get_model(model_id)
        return web.json_response({"environments": [
            self.environment_json(e) for e in self.store.list_environments(model_id)]})

    async def create_environment(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        data = await json_body(request)
        name = str_field(data, "name", required=True)
        assert name is not None
        raw = data.get("autoscaling_settings")
        settings = AutoscalingSettings.from_json(raw) if raw is not None else None
        raw_promotion = data.get("promotion_settings")
        promotion = (PromotionSettings.from_json(raw_promotion)
                     if raw_promotion is not None else None)
        env = self.store.create_environment(model_id, name, settings)
        if promotion is not None:
            env = self.store.set_promotion_settings(model_id, name, promotion)
        return web.json_response(self.environment_json(env), status=201)

    async def get_environment(self, request: web.Request) -> web.Response:
        env = self.store.get_environment(request.match_info["model_id"],
                                         request.match_info["env_name"])
        return web.json_response(self.environment_json(env))

    async def patch_environment(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        env_name = request.match_info["env_name"]
        data = await json_body(request)
        unknown = set(data) - {"autoscaling_settings", "promotion_settings"}
        if unknown:
            raise RequestError("is not an environment setting", field=sorted(unknown)[0])
        patch = data.get("autoscaling_settings") or {}
        before = self.store.get_environment(model_id, env_name)
        # Both parts are validated before either is written: a bad body changes nothing.
        promotion = before.promotion_settings.patched(data.get("promotion_settings") or {})
        before.settings.patched(patch)
        env = self.c.update_environment_settings(model_id, env_name, patch)
        if promotion != env.promotion_settings:
            env = self.store.set_promotion_settings(model_id, env_name, promotion)
        status = ("UNCHANGED" if (env.settings, env.promotion_settings)
                  == (before.settings, before.promotion_settings) else "ACCEPTED")
        return web.json_response({"status": status,
                                  "message": f"environment {env_name!r} settings {status.lower()}",
                                  "autoscaling_settings": env.settings.to_json(),
                                  "promotion_settings": env.promotion_settings.to_json()})

    async def promotion_action(self, request: web.Request) -> web.Response:
        """``{pause,resume,cancel,force_cancel,force_roll_forward}_promotion``."""
        model_id = request.match_info["model_id"]
        action = ACTIONS_BY_PATH[request.path.rsplit("/", 1)[1]]
        self.store.get_model(model_id)
        return web.json_response(
            self.c.promotion_action(model_id, request.match_info["env_name"], action))

    async def delete_environment(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        env_name = request.match_info["env_name"]
        self.store.delete_environment(model_id, env_name)
        self.c.forget_promotion(model_id, env_name)
        return web.json_response({"name": env_name, "deleted": True})


def chain_transport_key(keys: Sequence[str]) -> str:
    """The key chainlet replicas call each other with: derived from the server's first API
    key (so it outlives a restart, like the pods that hold it) but not that key, and
    accepted only on ``…/run_remote`` routes — user code in a chainlet can call chains,
    never the management API."""
    return hmac.new(keys[0].encode(), b"bdn chains transport", "sha256").hexdigest()


def _is_chain_call(request: web.Request) -> bool:
    return request.method == "POST" and request.path.endswith("/run_remote")


def auth_middleware(keys: tuple[str, ...]) -> Any:
    encoded = [k.encode() for k in keys]
    transport = chain_transport_key(keys).encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(OPEN_PATHS):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme != AUTH_SCHEME or not given:
            return error_response(401, "missing API key: send the header "
                                       "'Authorization: Api-Key <key>'")
        given_b = given.strip().encode()
        # Compare against every key so timing does not reveal which one matched.
        ok = False
        for key in encoded:
            ok |= hmac.compare_digest(given_b, key)
        if not ok and _is_chain_call(request):
            ok = hmac.compare_digest(given_b, transport)
        if not ok:
            return error_response(401, "the API key is not valid")
        return await handler(request)
    return middleware


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ControlError as e:
        return error_response(e.status, str(e))
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(e.status, e.reason)
        raise


async def build_app(options: ServerOptions,
                    backend: ReplicaBackend | None = None) -> web.Application:
    """The control server app; its cleanup stops every replica it started."""
    store = Store(options.state_dir / STATE_FILE_NAME)
    metrics = Metrics()
    blobs = BlobStore(options.store_url or default_store_url())
    pushes = Pushes(options.state_dir, blobs,
                    secrets_resolver=SecretResolver.from_env(options.secrets_dir))
    embedded = None
    if backend is None:
        address = options.agent
        if address is None:
            embedded = EmbeddedAgent(options.state_dir, blobs.url,
                                     cache_peers=options.cache_peers)
            address = embedded.address
        delivery = AgentDelivery(address, options.state_dir / "mounts")
        backend = LocalProcessBackend(options.backend, delivery)
    controller = Controller(store, backend, metrics, options.controller)
    controller.secret_env = pushes.secret_env
    router = Router(controller)
    app = web.Application(middlewares=[error_middleware, auth_middleware(options.api_keys)],
                          client_max_size=1 << 30)
    ManagementApi(controller, pushes).add_routes(app)
    router.add_routes(app)
    ChainsApi(controller, pushes, router,
              chain_transport_key(options.api_keys)).add_routes(app)

    metrics.serve_gauges(controller.gauges)

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/metrics", prom.metrics_handler(metrics.registry))
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", live)
    app["controller"] = controller

    async def on_startup(app: web.Application) -> None:
        if embedded is not None:
            await embedded.start()
        await controller.start()

    async def on_cleanup(app: web.Application) -> None:
        await controller.close()
        await router.close()
        if embedded is not None:
            await embedded.stop()
        store.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app
