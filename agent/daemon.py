"""The agent daemon: the node's local API over a unix socket (optionally loopback TCP).

Routes (JSON unless said otherwise)::

    POST   /v1/pulls               start a pull → 202 {"id", "state", "created"}
                                   (Idempotency-Key header: same key + same body → same
                                   pull, 200; same key + other body → 409)
    GET    /v1/pulls               every pull's status
    GET    /v1/pulls/{id}          state, files done, bytes by tier, throughput, ETA, error
    GET    /v1/pulls/{id}/events   newline-delimited JSON events, replayed from the first
    DELETE /v1/pulls/{id}          release the pull's mounts and pins
    GET    /v1/status              node cache usage, peers, store, pulls
    GET    /healthz                "ok"
    GET    /metrics                Prometheus text

A pull body is either a ref or manifest digest::

    {"ref": "ns/model:tag" | "b3:<hex>", "mount": "/abs/dir" | null}

or ``weights:`` entries as in ``config.yaml`` (each may add ``"ref"`` to pin a manifest;
otherwise the entry resolves by ``agent.resolve.entry_target``)::

    {"weights": [{"source": "hf://org/m@rev", "mount_location": "/models/m", ...}],
     "mount_root": "/abs/dir" | null}

``mount_root`` prefixes every ``mount_location`` (tests and hosts that map pod paths);
``"prewarm": true`` fills the node cache without mounting; ``"order": "path"`` turns off
loader ordering.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any

from aiohttp import web

from agent.engine import Engine, parse_request
from agent.errors import IdempotencyConflict, RequestError
from agent.options import AgentOptions
from bdn.errors import BdnError, PathError
from bdn.service import ListenAddress, announce, signal_stop

log = logging.getLogger(__name__)

ENGINE_KEY: web.AppKey[Engine] = web.AppKey("engine", Engine)
MAX_REQUEST_BYTES = 8 * 1024 * 1024
# Open event streams are ended on shutdown; a handler still busy after this is cut off.
SHUTDOWN_TIMEOUT_S = 5.0


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status, dumps=lambda d: json.dumps(d, indent=None))


def _error(status: int, message: str, kind: str) -> web.Response:
    return _json({"error": message, "kind": kind}, status=status)


async def post_pull(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "the request body is not JSON", "RequestError")
    try:
        pull_request = parse_request(body)
        pull, created = await engine.submit(pull_request, request.headers.get("Idempotency-Key"))
    except IdempotencyConflict as e:
        return _error(409, str(e), type(e).__name__)
    except (RequestError, PathError) as e:
        return _error(400, str(e), type(e).__name__)
    return _json({"id": pull.id, "state": pull.state, "created": created,
                  "events": f"/v1/pulls/{pull.id}/events"}, status=202 if created else 200)


def _pull(request: web.Request) -> Any:
    engine = request.app[ENGINE_KEY]
    pull = engine.pulls.get(request.match_info["id"])
    if pull is None:
        raise web.HTTPNotFound(text=json.dumps({"error": "no such pull", "kind": "NotFound"}),
                               content_type="application/json")
    return pull


async def get_pull(request: web.Request) -> web.Response:
    return _json(_pull(request).status())


async def list_pulls(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    return _json({"pulls": [p.status() for p in engine.pulls.values()]})


async def pull_events(request: web.Request) -> web.StreamResponse:
    pull = _pull(request)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                       "Cache-Control": "no-store"})
    await resp.prepare(request)
    try:
        batch: list[bytes] = []
        async for ev in pull.follow():
            batch.append(json.dumps(ev, separators=(",", ":")).encode() + b"\n")
            # Replayed history goes out in large writes, live events one by one.
            if len(batch) >= 256 or ev.get("event") in ("done", "error") or not (
                    pull.events and ev is not pull.events[-1]):
                await resp.write(b"".join(batch))
                batch = []
        if batch:
            await resp.write(b"".join(batch))
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return resp


async def delete_pull(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    pull = _pull(request)
    await engine.release(pull.id)
    return _json(pull.status())


async def status(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    opts = engine.options
    states: dict[str, int] = {}
    for p in engine.pulls.values():
        states[p.state] = states.get(p.state, 0) + 1
    return _json({"cache_dir": str(opts.cache_dir), "node_cache": engine.node.stats(),
                  "peers": list(opts.peers), "store": opts.store_url, "strict": opts.strict,
                  "ring_client": engine.ring is not None, "pulls": states,
                  "counters": dict(engine.counters),
                  "active": [p.status() for p in engine.pulls.values()
                             if p.state in ("queued", "running")]})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=request.app[ENGINE_KEY].metrics_text(),
                        content_type="text/plain")


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except BdnError as e:
        return _error(400 if isinstance(e, ValueError) else 500, str(e), type(e).__name__)


async def make_app(options: AgentOptions) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[errors_middleware])
    engine = Engine(options)
    app[ENGINE_KEY] = engine
    resumed = engine.restore()
    if resumed:
        log.info("resuming %d unfinished pull(s)", len(resumed))

    async def shutdown(_app: web.Application) -> None:
        engine.close_streams()

    async def cleanup(_app: web.Application) -> None:
        await engine.close()
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    app.router.add_post("/v1/pulls", post_pull)
    app.router.add_get("/v1/pulls", list_pulls)
    app.router.add_get("/v1/pulls/{id}", get_pull)
    app.router.add_get("/v1/pulls/{id}/events", pull_events)
    app.router.add_delete("/v1/pulls/{id}", delete_pull)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def run_daemon(options: AgentOptions, socket_path: str | None,
               listen: str | None = None) -> int:
    """Serve on the unix socket and/or a loopback TCP address until SIGTERM/SIGINT.

    Prints ``BDN_LISTENING <url>`` once per bound address (the unix socket first).
    """
    if socket_path is None and listen is None:
        raise RequestError("the agent needs --socket PATH or --listen HOST:PORT")

    async def main() -> None:
        app = await make_app(options)
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            if socket_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket_path)
                await web.UnixSite(runner, socket_path).start()
                announce(f"unix:{socket_path}")
            if listen:
                addr = ListenAddress.parse(listen)
                site = web.TCPSite(runner, addr.host, addr.port, reuse_address=True)
                await site.start()
                server = site._server  # aiohttp has no public accessor for the port
                assert server is not None and server.sockets
                announce(f"http://{addr.host}:{server.sockets[0].getsockname()[1]}")
            await signal_stop().wait()
        finally:
            await runner.cleanup()
            if socket_path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket_path)

    asyncio.run(main())
    return 0
