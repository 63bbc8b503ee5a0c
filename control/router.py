"""The inference router: stable endpoints that forward to a deployment's replicas.

Endpoints follow Baseten's inference URLs, on the control server's own port:

- ``POST /models/{model_id}/production/predict`` (the production environment),
- ``POST /models/{model_id}/development/predict``,
- ``POST /models/{model_id}/deployment/{deployment_id}/predict``,
- ``POST /models/{model_id}/environments/{env_name}/predict``,

and the same paths without ``/models/{model_id}`` when the ``Host`` header names the
model (``model-{model_id}.<anything>``), as with Baseten's per-model hostnames.

A request counts as in flight for its deployment from arrival until its response body
has been written out (streams included); those counts are what the autoscaler samples.
With no ready replica the request waits in the deployment's bounded queue (see
``Controller.acquire``), and the deployment is asked for a replica at once. Bodies pass
through as bytes; large or chunked responses are streamed, not buffered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from control.controller import Controller, Runtime
from control.errors import ControlError, NotFoundError
from control.store import DEVELOPMENT, PRODUCTION

log = logging.getLogger(__name__)

# Responses up to this size are read whole (one write); larger ones are streamed.
BUFFER_LIMIT_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 10.0
# A request whose replica refuses the connection is retried once on another replica.
CONNECT_ATTEMPTS = 2
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate", "content-length", "host"}


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


class Router:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # No total timeout: a prediction may legitimately take minutes. No connection
            # cap: the replicas' own predict_concurrency is the limit that matters.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def add_routes(self, app: web.Application) -> None:
        for prefix in ("/models/{model_id}", ""):
            app.router.add_post(prefix + "/production/predict", self.production)
            app.router.add_post(prefix + "/development/predict", self.development)
            app.router.add_post(prefix + "/deployment/{deployment_id}/predict", self.deployment)
            app.router.add_post(prefix + "/environments/{env_name}/predict", self.environment)

    # -- resolving the target ----------------------------------------------------------

    @staticmethod
    def model_id(request: web.Request) -> str:
        if "model_id" in request.match_info:
            return request.match_info["model_id"]
        host = (request.host or "").split(":")[0]
        if host.startswith("model-") and "." in host:
            return host[len("model-"):].split(".")[0]
        raise NotFoundError("no model in the URL: use /models/{model_id}/... or a Host header "
                            "of the form model-{model_id}.<domain>", kind="model", ident="")

    def _env_runtime(self, model_id: str, env_name: str) -> Runtime:
        store = self.controller.store
        store.get_model(model_id)
        env = store.get_environment(model_id, env_name)
        if env.current_deployment_id is None:
            raise NotFoundError(f"environment {env_name!r} of model {model_id} has no "
                                "deployment yet; promote one first", kind="environment",
                                ident=env_name)
        return self.controller.runtime(env.current_deployment_id)

    async def production(self, request: web.Request) -> web.StreamResponse:
        return await self._call(request, lambda: self._env_runtime(self.model_id(request),
                                                                   PRODUCTION))

    async def environment(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["env_name"]
        return await self._call(request, lambda: self._env_runtime(self.model_id(request), name))

    async def development(self, request: web.Request) -> web.StreamResponse:
        def resolve() -> Runtime:
            model_id = self.model_id(request)
            self.controller.store.get_model(model_id)
            return self.controller.runtime(
                self.controller.store.development_deployment(model_id).id)
        return await self._call(request, resolve)

    async def deployment(self, request: web.Request) -> web.StreamResponse:
        dep_id = request.match_info["deployment_id"]

        def resolve() -> Runtime:
            model_id = self.model_id(request)
            if dep_id == DEVELOPMENT:
                dep_id_ = self.controller.store.development_deployment(model_id).id
            else:
                dep_id_ = self.controller.store.get_deployment(model_id, dep_id).id
            return self.controller.runtime(dep_id_)
        return await self._call(request, resolve)

    # -- forwarding --------------------------------------------------------------------

    async def _call(self, request: web.Request,
                    resolve: Callable[[], Runtime]) -> web.StreamResponse:
        metrics = self.controller.metrics
        try:
            rt = resolve()
        except ControlError as e:
            return error_response(e.status, str(e))
        labels = rt.labels()
        rt.in_flight += 1
        status = 500
        try:
            body = await request.read()
            for attempt in range(CONNECT_ATTEMPTS):
                try:
                    replica, waited_s = await self.controller.acquire(rt)
                except ControlError as e:
                    status = e.status
                    return error_response(e.status, str(e))
                if waited_s > 0:
                    metrics.queue_wait.observe(waited_s, labels)
                try:
                    response = await self._forward(request, replica.url, body)
                    status = response.status
                    return response
                except aiohttp.ClientConnectorError as e:
                    # Nothing was sent: the replica is gone (crashed between two health
                    # checks). Take it out of rotation and try another one.
                    self.controller.replica_unreachable(rt, replica, str(e))
                    if attempt + 1 < CONNECT_ATTEMPTS:
                        continue
                    status = 502
                    return error_response(502, f"replica {replica.id} of deployment "
                                               f"{rt.record.id} is unreachable: {e}")
                except (aiohttp.ClientError, TimeoutError) as e:
                    status = 502
                    log.warning("replica %s failed a request: %s", replica.id, e)
                    return error_response(502, f"replica {replica.id} of deployment "
                                               f"{rt.record.id} failed: {e!r}")
                finally:
                    self.controller.release(rt, replica)
            raise AssertionError("unreachable")
        finally:
            rt.in_flight -= 1
            metrics.requests.inc((*labels, ("code", str(status))))

    async def _forward(self, request: web.Request, base_url: str,
                       body: bytes) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "authorization"}
        started = time.monotonic()
        async with self.session().post(f"{base_url}/predict", data=body,
                                       headers=headers) as up:
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP}
            length = up.content_length
            if length is not None and length <= BUFFER_LIMIT_BYTES:
                data = await up.read()
                return web.Response(status=up.status, body=data, headers=out_headers)
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            log.debug("streamed response from %s in %.3f s", base_url,
                      time.monotonic() - started)
            return resp
