"""A test proxy in front of a cache peer (or any HTTP server): counts requests, and can
corrupt, truncate, refuse (503) or slow down object responses. Run as a real process;
prints ``BDN_LISTENING <url>``.

    python agent_proxy.py --upstream http://127.0.0.1:PORT [--flip] [--corrupt N]
        [--truncate N] [--busy-for-s S] [--delay-ms N] [--hold-ms N]

Faults apply to ``GET /v1/objects/{digest}`` answers, per digest:

* ``--corrupt N`` flips one bit in the body of the first ``N`` responses for each digest
  (``-1``: every response); ``--flip`` is ``--corrupt 1``.
* ``--truncate N`` sends the first ``N`` responses for each digest with their full
  ``Content-Length`` but only half the body, then drops the connection.
* ``--busy-for-s S`` answers ``503`` with ``Retry-After: 1`` (as the cache server does
  when its store cannot be read) to every object request for ``S`` seconds after the
  first one arrived: a store blip behind the cache, as the agent sees it.
* ``--delay-ms N`` holds each object response that long before sending (so a test can
  kill the agent mid-pull).
* ``--hold-ms N`` forwards each object request at once (so the pod behind starts its
  fill) but holds the answer that long before sending it: a pod that is alive and
  filling but slow to answer, as a loaded pod looks to an agent's first-byte deadline.

``Cache-Control`` is forwarded both ways with ``Range`` (an agent's ``only-if-cached``
must reach the pod).

``GET /proxy/stats`` returns ``{"requests": {digest: n}, "reports": {digest: n},
"flipped": [digest, ...], "truncated": [...], "busy": n, "paths": {path: n}}``;
``POST /v1/objects/{d}/verify`` is counted as a report and answered ``200`` without
forwarding (the bytes upstream are fine; the proxy lied). Every other ``GET``/``HEAD``
is forwarded with its ``Range`` header and counted by path in ``paths`` — in front of
a blob store served over HTTP, that counts what the agent read from the store.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp
from aiohttp import web

FORWARDED_HEADERS = ("content-range", "content-type", "etag", "accept-ranges",
                     "content-encoding", "cache-control")
# Request headers passed on to the upstream.
FORWARDED_REQUEST_HEADERS = ("range", "accept-encoding", "cache-control", "x-bdn-wait-s")
BUSY_RETRY_AFTER_S = 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--corrupt", type=int, default=0)
    ap.add_argument("--truncate", type=int, default=0)
    ap.add_argument("--busy-for-s", type=float, default=0.0)
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--hold-ms", type=int, default=0)
    args = ap.parse_args()
    corrupt = -1 if args.corrupt < 0 else max(args.corrupt, 1 if args.flip else 0)
    requests: dict[str, int] = {}
    served: dict[str, int] = {}  # answers with a body (not 503), per digest
    reports: dict[str, int] = {}
    paths: dict[str, int] = {}
    flipped: list[str] = []
    truncated: list[str] = []
    busy = {"n": 0, "since": None}
    session: aiohttp.ClientSession | None = None

    def is_busy() -> bool:
        if args.busy_for_s <= 0:
            return False
        now = time.monotonic()
        if busy["since"] is None:
            busy["since"] = now
        return now - busy["since"] < args.busy_for_s  # type: ignore[operator]

    async def objects(request: web.Request) -> web.StreamResponse:
        assert session is not None
        digest = request.match_info["digest"]
        requests[digest] = requests.get(digest, 0) + 1
        if is_busy():
            busy["n"] += 1  # type: ignore[operator]
            return web.Response(status=503, text="store unavailable (proxy)",
                                headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})
        if args.delay_ms:
            await asyncio.sleep(args.delay_ms / 1000)
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in FORWARDED_REQUEST_HEADERS}
        async with session.get(f"{args.upstream}/v1/objects/{digest}",
                               headers=headers) as up:
            body = bytearray(await up.read())
            out = {k: v for k, v in up.headers.items() if k.lower() in FORWARDED_HEADERS}
        if args.hold_ms:
            await asyncio.sleep(args.hold_ms / 1000)  # the slowness being simulated
        if up.status not in (200, 206) or not body:
            return web.Response(status=up.status, body=bytes(body), headers=out)
        n = served[digest] = served.get(digest, 0) + 1
        if corrupt < 0 or n <= corrupt:
            if digest not in flipped:
                flipped.append(digest)
            body[len(body) // 2] ^= 0x01
        elif n <= corrupt + args.truncate:
            if digest not in truncated:
                truncated.append(digest)
            resp = web.StreamResponse(status=up.status, headers=out)
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(bytes(body[:len(body) // 2]))
            assert request.transport is not None
            request.transport.close()  # the peer went away mid-body
            return resp
        return web.Response(status=up.status, body=bytes(body), headers=out)

    async def passthrough(request: web.Request) -> web.StreamResponse:
        assert session is not None
        paths[request.path] = paths.get(request.path, 0) + 1
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in FORWARDED_REQUEST_HEADERS}
        async with session.request(request.method, f"{args.upstream}{request.path_qs}",
                                   headers=headers, allow_redirects=False) as up:
            body = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() in FORWARDED_HEADERS}
            if request.method == "HEAD":
                resp = web.StreamResponse(status=up.status, headers=out)
                if up.content_length is not None:
                    resp.content_length = up.content_length
                await resp.prepare(request)
                await resp.write_eof()
                return resp
            return web.Response(status=up.status, body=body, headers=out)

    async def verify(request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        reports[digest] = reports.get(digest, 0) + 1
        return web.json_response({"digest": digest, "status": "ok"})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": requests, "reports": reports,
                                  "flipped": flipped, "truncated": truncated,
                                  "busy": busy["n"], "paths": paths})

    async def start(app: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(auto_decompress=False)

    async def stop(app: web.Application) -> None:
        if session is not None:
            await session.close()

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get("/v1/objects/{digest}", objects)
    app.router.add_post("/v1/objects/{digest}/verify", verify)
    app.router.add_get("/proxy/stats", stats)
    app.router.add_route("HEAD", "/{tail:.*}", passthrough)
    app.router.add_get("/{tail:.*}", passthrough, allow_head=False)

    async def run() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        print(f"BDN_LISTENING http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
