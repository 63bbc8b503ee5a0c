"""A stand-in for ``bdn serve`` that speaks the same replica contract, for control tests.

``python replica_standin.py MODEL_DIR --listen HOST:PORT`` binds, prints
``BDN_LISTENING <url>``, then runs ``Model.load()`` from ``MODEL_DIR/model/model.py``;
``/health/live`` answers at once, ``/health/ready`` is 200 only after ``load()`` returned,
``POST /predict`` runs ``Model.predict`` on the JSON body (at most
``predict_concurrency`` at a time) and streams the result when it is a generator. It
prints no ``BDN_READY`` line, so the backend's ``/health/ready`` probe is what finds it
ready. A request with an ``X-Body-Log: PATH`` header has its body read as it comes, and
the bytes received so far appended to PATH after each chunk, so a test can see that the
router streams a body rather than buffering it. The control tests use it where a real
replica's start-up time (torch) buys nothing, and for streaming, which ``bdn serve`` does
not do. It is a test double of another package, not of anything in ``control/``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import os
import signal
import sys
from pathlib import Path

import yaml
from aiohttp import web

from bdn.service import ListenAddress, announce, start_site


def load_model_class(model_dir: Path) -> type:
    spec = importlib.util.spec_from_file_location("model_under_test",
                                                  model_dir / "model" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model


async def main(model_dir: Path, listen: ListenAddress) -> None:
    config = yaml.safe_load((model_dir / "config.yaml").read_text()) or {}
    model = load_model_class(model_dir)()
    ready = asyncio.Event()
    limit = asyncio.Semaphore(int(config.get("runtime", {}).get("predict_concurrency")
                                  or config.get("predict_concurrency") or 1))

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def health_ready(request: web.Request) -> web.Response:
        if ready.is_set():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "loading"}, status=503)

    async def predict(request: web.Request) -> web.Response:
        if not ready.is_set():
            return web.json_response({"error": "not ready"}, status=503)
        log_path = request.headers.get("X-Body-Log")
        if log_path:
            # The test watches the body arrive here: one line per chunk, bytes so far.
            raw = bytearray()
            while chunk := await request.content.readany():
                raw += chunk
                with open(log_path, "a") as f:
                    f.write(f"{len(raw)}\n")
            body = json.loads(raw)
        else:
            body = await request.json()
        async with limit:
            result = await asyncio.to_thread(model.predict, body)
            if inspect.isgenerator(result):
                # A generator streams: each item is written as it is produced.
                resp = web.StreamResponse()
                resp.content_type = "text/plain"
                await resp.prepare(request)
                while (chunk := await asyncio.to_thread(next, result, None)) is not None:
                    await resp.write(str(chunk).encode())
                await resp.write_eof()
                return resp
        return web.Response(text=json.dumps(result), content_type="application/json")

    app = web.Application()
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", health_ready)
    app.router.add_post("/predict", predict)
    runner, url = await start_site(app, listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    announce(url)
    loading = asyncio.ensure_future(asyncio.to_thread(model.load))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
    if stopping.done():  # stopped while loading: leave without waiting for load()
        await runner.cleanup()
        os._exit(0)
    if loading.exception() is not None:
        print(f"load failed: {loading.exception()!r}", flush=True)
        sys.exit(3)
    ready.set()
    print("model loaded", flush=True)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()
    asyncio.run(main(args.model_dir, ListenAddress.parse(args.listen)))
