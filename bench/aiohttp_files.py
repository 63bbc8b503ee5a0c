"""A bare aiohttp file server (``add_static``: every response a ``FileResponse``, with
ranges and sendfile), for ``bench/cache.py`` to compare the cache against: what aiohttp
itself costs per response, before any of the cache's bookkeeping.

    python bench/aiohttp_files.py ROOT PORT
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


async def serve(root: str, port: int) -> None:
    app = web.Application()
    app.router.add_static("/", root)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until the benchmark stops this process


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
