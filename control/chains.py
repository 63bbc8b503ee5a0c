"""Chains on the control plane: one deployment per chainlet, the entrypoint as the chain.

``bdn chains push FILE`` generates a model folder per chainlet (``bdn_chains.codegen``),
uploads their files like ``bdn push`` does, and sends one ``POST /v1/chains``. Here that
one request mirrors every folder first (the slow part, where a failure leaves no record
behind), then creates one deployment per chainlet in one go — deleting those already
made if a later one fails — and records the *chain deployment*: which deployment serves
each chainlet. A published push is promoted, all chainlets together, to ``--environment``
(production by default); a development push (``--watch``) re-pushes each chainlet's
development deployment, which replaces its code while the mirror skips weights already
in the store.

Invocation follows the seed documentation's URLs (``/chains/{chain_id}/production/
run_remote``, ``/development/...``, ``/deployment/{id}/...``, ``/environments/{env}/...``,
and the same paths under ``Host: chain-{chain_id}.…``). A chainlet calls a dependency at
``/chains/{chain_id}/deployment/{chain_deployment_id}/chainlets/{name}/run_remote``: the
deployment the chain deployment pinned, so a promotion never mixes versions. Every call
goes through :class:`control.router.Router`, so it is queued, counted for autoscaling and
wakes a chainlet scaled to zero like any request.

Replicas learn where the control plane is and a key for it from their environment
(``bdn_chains.remote.URL_ENV``/``KEY_ENV``), added when the replica starts (a chainlet's
pushed config declares the marker secret :data:`TRANSPORT_SECRET`), never stored with the
deployment. The URL is ``BDN_CHAINS_URL`` of the server's environment when set (a
Service name on Kubernetes), else the address the server bound, else the address a chain
request reached it on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from bdn import settings
from bdn_chains.remote import (
    CHAIN_DEPLOYMENT_ENV,
    CHAIN_ENV,
    ERROR_KEY,
    KEY_ENV,
    URL_ENV,
    ChainletFailed,
)
from control.controller import Controller, Runtime
from control.errors import ControlError, NotFoundError, RequestError
from control.push import Pushes, PushRecord, parse_files
from control.router import Router, error_response
from control.settings import AutoscalingSettings
from control.store import DEVELOPMENT, PRODUCTION, check_name, new_id

log = logging.getLogger(__name__)

TRANSPORT_SECRET = "bdn-chains-transport"
HOST_PREFIX = "chain-"
MAX_CHAINLETS = 64


def _chainlet_name(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.isidentifier():
        raise RequestError(f"must be a chainlet class name, got {value!r}", field=field)
    return value


@dataclasses.dataclass(frozen=True)
class ChainletPush:
    name: str
    model_name: str
    files: tuple[Any, ...]
    settings: AutoscalingSettings | None


def parse_chain_push(data: dict[str, Any]) -> tuple[str, str, list[ChainletPush]]:
    name = check_name(data.get("name"), "name")
    entrypoint = _chainlet_name(data.get("entrypoint"), "entrypoint")
    raw = data.get("chainlets")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_CHAINLETS:
        raise RequestError(f"must be a list of 1 to {MAX_CHAINLETS} chainlets",
                           field="chainlets")
    out = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise RequestError("must be an object", field=f"chainlets[{i}]")
        settings = c.get("autoscaling_settings")
        out.append(ChainletPush(
            name=_chainlet_name(c.get("name"), f"chainlets[{i}].name"),
            model_name=check_name(c.get("model_name"), f"chainlets[{i}].model_name"),
            files=tuple(parse_files(c.get("files"))),
            settings=AutoscalingSettings.from_json(settings) if settings else None))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise RequestError("chainlet names must be unique", field="chainlets")
    if entrypoint not in names:
        raise RequestError(f"{entrypoint!r} is not one of the chainlets", field="entrypoint")
    return name, entrypoint, out


class ChainsApi:
    """``/v1/chains`` (push, list) and ``/chains/...`` (invocation)."""

    def __init__(self, controller: Controller, pushes: Pushes | None, router: Router,
                 transport_key: str | None) -> None:
        self.c = controller
        self.store = controller.store
        self.pushes = pushes
        self.router = router
        self.url: str | None = settings.CHAINS_URL.get()
        self.app: web.Application | None = None
        # Replicas get a key good for run_remote calls only (control.api), never an API key.
        self._key = transport_key
        inner: Callable[[Sequence[str]], list[tuple[str, str]]] | None = controller.secret_env

        def secret_env(names: Sequence[str]) -> list[tuple[str, str]]:
            names = list(names)
            out: list[tuple[str, str]] = []
            if TRANSPORT_SECRET in names:
                names.remove(TRANSPORT_SECRET)
                url = self.control_url()
                if url:
                    out.append((URL_ENV, url))
                if self._key:
                    out.append((KEY_ENV, self._key))
            return out + (inner(names) if inner is not None else [])
        controller.secret_env = secret_env

    def control_url(self) -> str | None:
        """Where replicas reach this server: configured, else the bound address
        (``bdn.service`` records it on the app), else where a chain request came in."""
        if self.url is None and self.app is not None:
            self.url = self.app.get("bdn.url")
        return self.url

    def add_routes(self, app: web.Application) -> None:
        self.app = app
        r = app.router
        r.add_post("/v1/chains", self.push)
        r.add_get("/v1/chains", self.list_chains)
        r.add_get("/v1/chains/{chain_id}", self.get_chain)
        for prefix in ("/chains/{chain_id}", ""):
            r.add_post(prefix + "/production/run_remote", self.production)
            r.add_post(prefix + "/development/run_remote", self.development)
            r.add_post(prefix + "/deployment/{deployment_id}/run_remote", self.deployment)
            r.add_post(prefix + "/environments/{env_name}/run_remote", self.environment)
        r.add_post("/chains/{chain_id}/deployment/{deployment_id}/chainlets/{chainlet}"
                   "/run_remote", self.chainlet)

    def _learn_url(self, request: web.Request) -> None:
        if self.control_url() is not None or request.transport is None:
            return
        sock = request.transport.get_extra_info("sockname")
        if sock:
            host, port = sock[0], sock[1]
            self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # -- push ----------------------------------------------------------------------------

    async def push(self, request: web.Request) -> web.Response:
        self._learn_url(request)
        try:
            data = await request.json()
        except ValueError as e:
            raise RequestError(f"the body is not JSON: {e}", field="body") from e
        if not isinstance(data, dict):
            raise RequestError("the body must be a JSON object", field="body")
        if self.pushes is None:
            raise RequestError("this control server takes no pushed folders (no store)",
                               field="chainlets")
        name, entrypoint, chainlets = parse_chain_push(data)
        development = bool(data.get("development", False))
        environment = data.get("environment")
        if environment is not None:
            check_name(environment, "environment")
            if development:
                raise RequestError("a development push is not promoted; leave out "
                                   "environment or development", field="environment")
        pushes = self.pushes
        records = await asyncio.to_thread(lambda: [pushes.push(list(c.files), None)
                                                   for c in chainlets])
        chain_id, _ = self.store.create_chain(name)
        return web.json_response(self._create(chain_id, name, entrypoint, chainlets, records,
                                              development, environment), status=201)

    def _create(self, chain_id: str, name: str, entrypoint: str,
                chainlets: list[ChainletPush], records: list[PushRecord], development: bool,
                environment: str | None) -> dict[str, Any]:
        chain_dep_id = (self.store.get_chain_deployment(chain_id, DEVELOPMENT)["id"]
                        if development and self._has_development(chain_id) else None)
        chain_dep_id = chain_dep_id or new_id()
        made: list[tuple[str, str]] = []
        mapping: dict[str, dict[str, str]] = {}
        try:
            for c, rec in zip(chainlets, records, strict=True):
                model = self._model(c.model_name)
                env_vars = {**rec.environment_variables, CHAIN_ENV: chain_id,
                            CHAIN_DEPLOYMENT_ENV: chain_dep_id}
                record = dataclasses.replace(
                    rec, environment_variables=env_vars,
                    secret_names=(*rec.secret_names, TRANSPORT_SECRET))
                dep = self.c.push(model, record.code, name=None, development=development,
                                  settings=c.settings, push=record.to_json())
                if not development:
                    made.append((model, dep.id))
                mapping[c.name] = {"model_id": model, "deployment_id": dep.id}
        except Exception:
            for model_id, dep_id in made:
                try:
                    self.store.delete_deployment(model_id, dep_id)
                    self.c.refresh(dep_id)
                except (ControlError, KeyError) as e:
                    log.warning("could not undo deployment %s: %s", dep_id, e)
            raise
        chain_dep = self._record(chain_id, chain_dep_id, development, entrypoint, mapping)
        env = None if development else (environment or PRODUCTION)
        if env is not None:
            for target in mapping.values():
                try:
                    self.store.get_environment(target["model_id"], env)
                except NotFoundError:
                    self.store.create_environment(target["model_id"], env)
                self.c.promote(target["model_id"], env, target["deployment_id"])
        return {"id": chain_id, "name": name, "deployment": chain_dep, "environment": env}

    def _has_development(self, chain_id: str) -> bool:
        try:
            self.store.get_chain_deployment(chain_id, DEVELOPMENT)
        except NotFoundError:
            return False
        return True

    def _record(self, chain_id: str, dep_id: str, development: bool, entrypoint: str,
                mapping: dict[str, dict[str, str]]) -> dict[str, Any]:
        return self.store.add_chain_deployment(chain_id, development=development,
                                               entrypoint=entrypoint, chainlets=mapping,
                                               deployment_id=dep_id)

    def _model(self, model_name: str) -> str:
        try:
            return self.store.find_model(model_name).id
        except NotFoundError:
            return self.store.create_model(model_name).id

    async def list_chains(self, request: web.Request) -> web.Response:
        return web.json_response({"chains": [self._chain_json(c["id"])
                                             for c in self.store.list_chains()]})

    async def get_chain(self, request: web.Request) -> web.Response:
        chain = self.store.get_chain(request.match_info["chain_id"])
        return web.json_response(self._chain_json(chain["id"]))

    def _chain_json(self, chain_id: str) -> dict[str, Any]:
        chain = self.store.get_chain(chain_id)
        return {**chain, "deployments": self.store.list_chain_deployments(chain["id"])}

    # -- invocation ------------------------------------------------------------------------

    def chain_id(self, request: web.Request) -> str:
        if "chain_id" in request.match_info:
            ident = request.match_info["chain_id"]
        else:
            host = (request.host or "").split(":")[0]
            if not (host.startswith(HOST_PREFIX) and "." in host):
                raise NotFoundError("no chain in the URL: use /chains/{chain_id}/... or a "
                                    "Host header of the form chain-{chain_id}.<domain>",
                                    kind="chain", ident="")
            ident = host[len(HOST_PREFIX):].split(".")[0]
        return str(self.store.get_chain(ident)["id"])

    def _entrypoint(self, chain_id: str, deployment_id: str) -> Runtime:
        dep = self.store.get_chain_deployment(chain_id, deployment_id)
        target = dep["chainlets"][dep["entrypoint"]]
        return self.c.runtime(target["deployment_id"])

    def _env_entrypoint(self, chain_id: str, env_name: str) -> Runtime:
        deps = self.store.list_chain_deployments(chain_id)
        if not deps:
            raise NotFoundError(f"chain {chain_id} has no deployment", kind="chain",
                                ident=chain_id)
        target = deps[-1]["chainlets"][deps[-1]["entrypoint"]]
        env = self.store.get_environment(target["model_id"], env_name)
        if env.current_deployment_id is None:
            raise NotFoundError(f"environment {env_name!r} of chain {chain_id} has no "
                                "deployment yet (a promotion may still be warming up)",
                                kind="environment", ident=env_name)
        return self.c.runtime(env.current_deployment_id)

    async def _run(self, request: web.Request,
                   resolve: Callable[[], Runtime]) -> web.StreamResponse:
        self._learn_url(request)
        try:
            resolve()
        except ControlError as e:
            return error_response(e.status, str(e))
        resp = await self.router._call(request, resolve)
        return structured_error(resp)

    async def production(self, request: web.Request) -> web.StreamResponse:
        chain_id = self.chain_id(request)
        return await self._run(request, lambda: self._env_entrypoint(chain_id, PRODUCTION))

    async def environment(self, request: web.Request) -> web.StreamResponse:
        chain_id = self.chain_id(request)
        env = request.match_info["env_name"]
        return await self._run(request, lambda: self._env_entrypoint(chain_id, env))

    async def development(self, request: web.Request) -> web.StreamResponse:
        chain_id = self.chain_id(request)
        return await self._run(request, lambda: self._entrypoint(chain_id, DEVELOPMENT))

    async def deployment(self, request: web.Request) -> web.StreamResponse:
        chain_id = self.chain_id(request)
        dep = request.match_info["deployment_id"]
        return await self._run(request, lambda: self._entrypoint(chain_id, dep))

    async def chainlet(self, request: web.Request) -> web.StreamResponse:
        chain_id = self.chain_id(request)
        dep = self.store.get_chain_deployment(chain_id, request.match_info["deployment_id"])
        name = request.match_info["chainlet"]
        target = dep["chainlets"].get(name)
        if target is None:
            raise NotFoundError(f"chain deployment {dep['id']} has no chainlet {name!r}",
                                kind="chainlet", ident=name)
        return await self._run(request, lambda: self.c.runtime(target["deployment_id"]))


def structured_error(resp: web.StreamResponse) -> web.StreamResponse:
    """A chainlet's failure as the documented ``{"error": RemoteErrorDetail}``.

    The replica reports it as its ordinary 500 (``"ChainletFailed: <detail JSON>"``);
    anything else passes through unchanged."""
    if resp.status != 500 or not isinstance(resp, web.Response) or resp.body is None:
        return resp
    try:
        doc = json.loads(bytes(resp.body))  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return resp
    message = doc.get(ERROR_KEY) if isinstance(doc, dict) else None
    if not isinstance(message, str) or not message.startswith(ChainletFailed.MARKER):
        return resp
    try:
        detail = json.loads(message[len(ChainletFailed.MARKER):])
    except ValueError:
        return resp
    return web.json_response({ERROR_KEY: detail}, status=500)
