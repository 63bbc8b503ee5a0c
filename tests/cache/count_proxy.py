"""An HTTP proxy that counts the body bytes a store sends (run as a script).

``count_proxy.py UPSTREAM --listen 127.0.0.1:0`` forwards every request to ``UPSTREAM``
(a moto S3 server, fake-gcs-server, ``store_http.py``) unchanged and streams the answer
back, counting each response body byte as it passes. A cache pod pointed at the proxy
(``--store-endpoint-url`` or an ``http://`` store URL) reads its store through it, so
``GET /_count/stats`` says how many bytes the store really sent, counted outside bdn
(independent of its metrics): ``{"body_bytes": n, "requests": [[method, path, range,
status, bytes], ...]}``. Prints ``BDN_LISTENING <url>`` like every bdn service.

Headers pass through except the hop-by-hop ones; bodies are neither decoded nor
re-encoded (``auto_decompress=False``), so what is counted is what was on the wire.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web
from yarl import URL

from bdn.service import ListenAddress, serve_forever

STATS_PATH = "/_count/stats"
COPY_BLOCK_BYTES = 256 * 1024
# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding",
                        "upgrade", "host"})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("upstream", help="base URL requests are forwarded to")
    ap.add_argument("--listen", default="127.0.0.1:0")
    args = ap.parse_args()
    upstream = args.upstream.rstrip("/")
    log: list[list[object]] = []
    total = {"body_bytes": 0}

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({**total, "requests": log})

    async def forward(request: web.Request) -> web.StreamResponse:
        session: aiohttp.ClientSession = request.app["session"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        entry: list[object] = [request.method, request.raw_path,
                               request.headers.get("Range", ""), 0, 0]
        log.append(entry)
        async with session.request(request.method, URL(upstream + request.raw_path, encoded=True),
                                   headers=headers, data=body or None,
                                   allow_redirects=False) as up:
            entry[3] = up.status
            resp = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP})
            await resp.prepare(request)
            async for block in up.content.iter_chunked(COPY_BLOCK_BYTES):
                entry[4] = int(entry[4]) + len(block)  # type: ignore[call-overload]
                total["body_bytes"] += len(block)
                await resp.write(block)
            await resp.write_eof()
            return resp

    async def make_app() -> web.Application:
        app = web.Application(client_max_size=1 << 30)

        async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
            app["session"] = aiohttp.ClientSession(
                auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))
            yield
            await app["session"].close()

        app.cleanup_ctx.append(session_ctx)
        app.router.add_get(STATS_PATH, stats)
        app.router.add_route("*", "/{path:.*}", forward)
        return app

    return serve_forever(make_app, ListenAddress.parse(args.listen))


if __name__ == "__main__":
    raise SystemExit(main())
