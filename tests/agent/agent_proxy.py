"""A test proxy in front of a cache peer: counts requests per digest, can flip a bit,
can slow responses down. Run as a real process; prints ``BDN_LISTENING <url>``.

    python agent_proxy.py --upstream http://127.0.0.1:PORT [--flip] [--delay-ms N]

``--flip`` flips one bit in the body of the *first* response for each object digest
(the agent must detect it, report it and refetch elsewhere). ``--delay-ms`` holds each
object response that long before sending (so a test can kill the agent mid-pull).
``GET /proxy/stats`` returns ``{"requests": {digest: n}, "reports": {digest: n},
"flipped": [digest, ...]}``; ``POST /v1/objects/{d}/verify`` is counted as a report and
answered ``200`` without forwarding (the bytes upstream are fine; the proxy lied).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import aiohttp
from aiohttp import web


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--delay-ms", type=int, default=0)
    args = ap.parse_args()
    requests: dict[str, int] = {}
    reports: dict[str, int] = {}
    flipped: list[str] = []
    session: aiohttp.ClientSession | None = None

    async def objects(request: web.Request) -> web.StreamResponse:
        assert session is not None
        digest = request.match_info["digest"]
        requests[digest] = requests.get(digest, 0) + 1
        if args.delay_ms:
            await asyncio.sleep(args.delay_ms / 1000)
        headers = {k: v for k, v in request.headers.items() if k.lower() == "range"}
        async with session.get(f"{args.upstream}/v1/objects/{digest}",
                               headers=headers) as up:
            body = bytearray(await up.read())
            if args.flip and up.status in (200, 206) and body and digest not in flipped:
                flipped.append(digest)
                body[len(body) // 2] ^= 0x01
            out = {k: v for k, v in up.headers.items()
                   if k.lower() in ("content-range", "content-type", "etag")}
            return web.Response(status=up.status, body=bytes(body), headers=out)

    async def passthrough(request: web.Request) -> web.StreamResponse:
        assert session is not None
        async with session.get(f"{args.upstream}{request.path}") as up:
            return web.Response(status=up.status, body=await up.read(),
                                content_type=up.content_type)

    async def verify(request: web.Request) -> web.Response:
        digest = request.match_info["digest"]
        reports[digest] = reports.get(digest, 0) + 1
        return web.json_response({"digest": digest, "status": "ok"})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": requests, "reports": reports,
                                  "flipped": flipped})

    async def start(app: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession()

    async def stop(app: web.Application) -> None:
        if session is not None:
            await session.close()

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get("/v1/objects/{digest}", objects)
    app.router.add_post("/v1/objects/{digest}/verify", verify)
    app.router.add_get("/proxy/stats", stats)
    app.router.add_get("/{tail:.*}", passthrough)

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
