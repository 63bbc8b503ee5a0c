"""A blob store folder served over HTTP, for cache tests (run as a script).

The cache reads it through fsspec's HTTP filesystem (``--store http://...``), so a test
can take the store *down* (stop this process) while the cache keeps running, and can
make a fill *stall* part-way (``--stall-after BYTES``: no body byte at or past that
offset of any object is sent) to kill the cache in the middle of a fill — or, with
``--gated``, to hold every response there until the test ``POST``s ``/_gate/open``. Prints
``BDN_LISTENING <url>`` like every bdn service. Single ranges only (all fsspec asks).
``GET /_stats`` counts the body bytes sent per top folder (``objects``, ``manifests``,
``refs``): what the store's readers really read, counted outside them
(``bench/fleet.py``'s origin bytes).

``--rate BYTES_PER_S`` (e.g. ``300M``) caps what all responses together send, as one
network link to a remote store would: a token bucket shared by every connection, in
blocks of ``SEND_BLOCK_BYTES``. On loopback a store is as fast as the CPU can copy, so
a benchmark of a transfer that should hide other work (``bench/coldstart.py``'s
``--store-rate``) needs the link's limit put back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from aiohttp import web

from bdn.service import ListenAddress, serve_forever
from cache.cli import parse_bytes

SEND_BLOCK_BYTES = 256 * 1024


class SharedRate:
    """A byte rate shared by every response: each block waits until the link would have
    sent it. Bytes are reserved first and paid for by waiting, so concurrent senders
    queue in order and together never exceed ``bytes_per_s`` (beyond one block)."""

    def __init__(self, bytes_per_s: int) -> None:
        self.bytes_per_s = bytes_per_s
        self._free_at = 0.0  # loop time at which the link has sent everything reserved

    async def take(self, n: int) -> None:
        now = asyncio.get_running_loop().time()
        start = max(now, self._free_at)
        self._free_at = start + n / self.bytes_per_s
        # This block may go out once the blocks reserved before it have been sent.
        if start > now:
            await asyncio.sleep(start - now)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--stall-after", type=int, default=None)
    ap.add_argument("--gated", action="store_true")
    ap.add_argument("--rate", type=parse_bytes, default=None, metavar="BYTES_PER_S",
                    help="cap the bytes per second of all responses together (e.g. 300M)")
    args = ap.parse_args()
    if args.rate is not None and args.rate <= 0:
        ap.error("--rate must be a positive number of bytes per second")
    root = Path(args.root).resolve()
    rate = SharedRate(args.rate) if args.rate is not None else None
    gate = asyncio.Event()
    sent: dict[str, int] = {}

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"bytes": sent})

    async def open_gate(request: web.Request) -> web.Response:
        gate.set()
        return web.json_response({"open": True})

    async def handle(request: web.Request) -> web.StreamResponse:
        rel = request.match_info["path"]
        path = (root / rel).resolve()
        if root not in path.parents or not path.is_file():
            raise web.HTTPNotFound()
        size = path.stat().st_size
        start, end, status = 0, size, 200
        rng = request.headers.get("Range")
        headers = {"Accept-Ranges": "bytes"}
        if rng and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start = int(a) if a else max(0, size - int(b))
            end = min(int(b) + 1, size) if a and b else size
            if start >= size:
                raise web.HTTPRequestRangeNotSatisfiable(
                    headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        with open(path, "rb") as f:
            pos = start
            while pos < end:
                n = min(SEND_BLOCK_BYTES, end - pos)
                if (args.stall_after is not None and pos + n > args.stall_after
                        and not gate.is_set()):
                    n = max(0, args.stall_after - pos)
                    if n == 0:
                        if not args.gated:
                            await asyncio.Event().wait()  # stall forever: the test kills us
                        await gate.wait()
                        continue
                if rate is not None:
                    await rate.take(n)
                await resp.write(os.pread(f.fileno(), n, pos))
                top = rel.split("/", 1)[0]
                sent[top] = sent.get(top, 0) + n
                pos += n
        await resp.write_eof()
        return resp

    async def make_app() -> web.Application:
        app = web.Application()
        app.router.add_post("/_gate/open", open_gate)
        app.router.add_get("/_stats", stats)
        app.router.add_route("GET", "/{path:.*}", handle)
        app.router.add_route("HEAD", "/{path:.*}", handle)
        return app

    return serve_forever(make_app, ListenAddress.parse(args.listen))


if __name__ == "__main__":
    raise SystemExit(main())
