"""The inference router: stable endpoints that forward to a deployment's replicas.

Endpoints follow Baseten's inference URLs, on the control server's own port:

- ``POST /models/{model_id}/production/predict`` (the production environment),
- ``POST /models/{model_id}/development/predict``,
- ``POST /models/{model_id}/deployment/{deployment_id}/predict``,
- ``POST /models/{model_id}/environments/{env_name}/predict``,

and the same paths without ``/models/{model_id}`` when the ``Host`` header names the
model (``model-{model_id}.<anything>``), as with Baseten's per-model hostnames.

Request bodies are streamed to the replica as they arrive, never buffered whole here, and
a request counts as in flight for its deployment (the autoscaler's signal) only once its
body has fully arrived, until its response body has been written out (streams
included): a slow upload is not load, and must not scale a deployment up. Until then, or
while it has no replica, the request *waits*; at most ``max_queue`` requests wait per
deployment, whether or not replicas are ready, and the next gets 429 with
``Retry-After``. A body must arrive within the queue timeout (408 otherwise).

With no ready replica the request waits in the deployment's queue (see
``Controller.acquire``) and the deployment is asked for a replica at once. While it
waits its body is read, up to ``HOLD_LIMIT_BYTES``, so that a body that has fully arrived
counts as in flight and wakes a deployment scaled to zero; the rest of a larger body
stays with the client (TCP flow control) until a replica can take it, and such a
request counts once that much has arrived, since nothing more can be known without a
replica. A replica that refuses the connection is replaced and the request retried on
another one, which is safe only while no body byte beyond the held part has been sent:
after that the request fails with 502. Large or chunked responses are streamed.

During a rolling promotion an environment's requests are split between the previous
deployment and the candidate by the rollout planner's share, chosen per request by the
environment's request count (``control.traffic.pick_by_count``: exact over any run of
requests, not just on average). Requests that name a deployment are never split. Request
metrics of environment paths carry an ``environment`` label.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from control.controller import Controller, Runtime
from control.errors import ControlError, NotFoundError, QueueFullError, RequestBodyError
from control.store import DEVELOPMENT, PRODUCTION
from control.traffic import Route, pick_by_count

log = logging.getLogger(__name__)

# Responses up to this size are read whole (one write); larger ones are streamed.
BUFFER_LIMIT_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 10.0
# A request whose replica refuses the connection is retried once on another replica.
CONNECT_ATTEMPTS = 2
# Read of a waiting request's body while no replica is ready (see the module docstring).
HOLD_LIMIT_BYTES = 1 << 20
# What a 429 asks the client to wait before retrying, in whole seconds (HTTP's unit).
RETRY_AFTER_S = 1
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-authorization", "proxy-authenticate", "content-length", "host"}


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


def control_error_response(e: ControlError) -> web.Response:
    resp = error_response(e.status, str(e))
    if isinstance(e, QueueFullError):
        resp.headers["Retry-After"] = str(e.retry_after_s)
    if isinstance(e, RequestBodyError):
        resp.force_close()  # the rest of the body is unread: do not drain it for keep-alive
    return resp


class HeldRequest:
    """One request's standing at the router and its body, read on demand.

    It *waits* (counted in ``rt.waiting``) from admission until it is in flight and has
    a replica; it is *in flight* (``rt.in_flight``) from the moment its body has fully
    arrived (or ``HOLD_LIMIT_BYTES`` of it, while no replica could take more) until
    :meth:`done`. Bytes read while holding are kept, so the body can be sent again to a
    second replica as long as nothing beyond them was sent (:attr:`replayable`).
    """

    def __init__(self, request: web.Request, rt: Runtime, deadline: float) -> None:
        self.content = request.content
        self.rt = rt
        self.deadline = deadline
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.replayable = True
        self.arrived = False  # every body byte has reached this process
        self.drained = False  # ... and has been read from the request
        self.counted = False
        self.has_replica = False
        self.waiting = True
        self.error: RequestBodyError | None = None
        rt.waiting += 1
        if not request.body_exists:
            self.drained = True
        if self.drained or self.content.is_eof():
            self._arrived()

    def _arrived(self) -> None:
        self.arrived = True
        self._count()

    def _count(self) -> None:
        if not self.counted:
            self.counted = True
            self.rt.in_flight += 1
        self._settle()

    def _settle(self) -> None:
        if self.waiting and self.counted and self.has_replica:
            self.waiting = False
            self.rt.waiting -= 1

    def took_replica(self) -> None:
        self.has_replica = True
        self._settle()

    def done(self) -> None:
        if self.waiting:
            self.waiting = False
            self.rt.waiting -= 1
        if self.counted:
            self.counted = False
            self.rt.in_flight -= 1

    async def _read(self) -> bytes:
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                chunk = await self.content.readany()
        except TimeoutError:
            self.error = RequestBodyError(
                "the request body did not fully arrive within the queue timeout",
                status=408, deployment_id=self.rt.record.id)
            raise self.error from None
        except Exception as e:  # the client went away or broke the framing
            self.error = RequestBodyError(f"the request body could not be read: {e}",
                                          status=400, deployment_id=self.rt.record.id)
            raise self.error from None
        if self.content.is_eof():
            self._arrived()
        if not chunk or self.content.at_eof():
            self.drained = True
        return chunk

    async def hold(self) -> None:
        """Read the body while no replica can take it, up to ``HOLD_LIMIT_BYTES``."""
        while not self.drained and self.held_bytes < HOLD_LIMIT_BYTES:
            chunk = await self._read()
            if chunk:
                self.held.append(chunk)
                self.held_bytes += len(chunk)
        self._count()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body for one send to a replica: what was held, then the rest as it comes."""
        for chunk in self.held:
            yield chunk
        while not self.drained:
            chunk = await self._read()
            self.replayable = False  # these bytes are not kept
            if chunk:
                yield chunk


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
        promo = self.controller.promotions.get((model_id, env_name))
        share = promo.share_new() if promo is not None else None
        if promo is not None and share is not None and promo.previous_id is not None:
            # A rolling promotion splits the environment's traffic, request by request.
            route = pick_by_count(share, next(promo.counter))
            return self.controller.runtime(
                promo.deployment_id if route is Route.CANDIDATE else promo.previous_id)
        if env.current_deployment_id is None:
            raise NotFoundError(f"environment {env_name!r} of model {model_id} has no "
                                "deployment yet; promote one first", kind="environment",
                                ident=env_name)
        return self.controller.runtime(env.current_deployment_id)

    async def production(self, request: web.Request) -> web.StreamResponse:
        return await self._call(request, lambda: self._env_runtime(self.model_id(request),
                                                                   PRODUCTION),
                                environment=PRODUCTION)

    async def environment(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["env_name"]
        return await self._call(request, lambda: self._env_runtime(self.model_id(request), name),
                                environment=name)

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

    async def _call(self, request: web.Request, resolve: Callable[[], Runtime], *,
                    environment: str | None = None) -> web.StreamResponse:
        metrics = self.controller.metrics
        options = self.controller.options
        try:
            rt = resolve()
        except ControlError as e:
            return error_response(e.status, str(e))
        labels = rt.labels()
        if environment is not None:
            labels = (*labels, ("environment", environment))
        if rt.waiting >= options.max_queue:
            metrics.requests.inc((*labels, ("code", "429")))
            return control_error_response(QueueFullError(
                f"deployment {rt.record.id} already has {options.max_queue} requests "
                "waiting (--max-queue); retry later", deployment_id=rt.record.id,
                retry_after_s=RETRY_AFTER_S))
        held = HeldRequest(request, rt, time.monotonic() + options.queue_timeout_s)
        status = 500
        try:
            for attempt in range(CONNECT_ATTEMPTS):
                if not rt.ready:
                    # No replica to stream to: read what is here, so that a body that
                    # has arrived counts as load (and wakes a deployment at zero).
                    await held.hold()
                replica, waited_s = await self.controller.acquire(rt)
                held.took_replica()
                if waited_s > 0:
                    metrics.queue_wait.observe(waited_s, labels)
                try:
                    response = await self._forward(request, replica.url, held)
                    status = response.status
                    return response
                except aiohttp.ClientConnectorError as e:
                    # Nothing was sent: the replica is gone (crashed between two health
                    # checks). Take it out of rotation and try another one, if the body
                    # can still be sent whole.
                    self.controller.replica_unreachable(rt, replica, str(e))
                    if attempt + 1 < CONNECT_ATTEMPTS and held.replayable:
                        continue
                    status = 502
                    return error_response(502, f"replica {replica.id} of deployment "
                                               f"{rt.record.id} is unreachable: {e}")
                except (aiohttp.ClientError, TimeoutError) as e:
                    if held.error is not None:  # the client's side failed, not the replica
                        raise held.error from None
                    status = 502
                    log.warning("replica %s failed a request: %s", replica.id, e)
                    return error_response(502, f"replica {replica.id} of deployment "
                                               f"{rt.record.id} failed: {e!r}")
                finally:
                    self.controller.release(rt, replica)
            raise AssertionError("unreachable")
        except ControlError as e:
            status = e.status
            return control_error_response(e)
        finally:
            held.done()
            metrics.requests.inc((*labels, ("code", str(status))))

    async def _forward(self, request: web.Request, base_url: str,
                       held: HeldRequest) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "authorization"}
        if request.content_length is not None:
            # Passed on so the replica can refuse an oversized body before reading it;
            # a chunked request is sent on chunked.
            headers["Content-Length"] = str(request.content_length)
        started = time.monotonic()
        async with self.session().post(f"{base_url}/predict", data=held.chunks(),
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
