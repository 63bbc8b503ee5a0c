"""The model server behind ``bdn serve``: HTTP around a :class:`ModelRuntime`.

The process contract the control plane relies on:

* the socket is bound and ``BDN_LISTENING <url>`` printed *before* the model loads, so
  ``GET /health/live`` answers (200) during a cold start and ``GET /health/ready``
  says 503 until ``load()`` has returned, 200 after;
* a failed ``load()`` prints the error with the model's own traceback to stderr and the
  process exits with status 1;
* SIGTERM/SIGINT stop it gracefully (in-flight requests finish, within a bound).

``POST /predict`` takes JSON (or msgpack when ``Content-Type: application/octet-stream``)
and answers in kind. At most ``predict_concurrency`` requests run the model at once;
the rest wait in aiohttp's handler. A model exception gives 500 with the traceback of
the model's code only (server frames are dropped: they say nothing to the user, and
would leak the server's layout). ``GET /metrics`` is Prometheus text: readiness, the
cold start phases, requests in flight and done.

The model's constructor and ``load()`` run in a daemon thread, so a SIGTERM during a
long load exits at once rather than after the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from aiohttp import web

from bdn.service import (
    LOADED_PREFIX,
    ListenAddress,
    announce,
    settle,
    signal_stop,
    start_site,
)
from serving.errors import ModelLoadError
from serving.runtime import ModelRuntime, model_traceback

log = logging.getLogger("bdn.serving.server")

MSGPACK_CONTENT_TYPE = "application/octet-stream"
# Requests carry model inputs (images, batches of text); aiohttp's 1 MiB default is low.
MAX_REQUEST_BYTES = 256 * (1 << 20)

RUNTIME_KEY = web.AppKey("runtime", ModelRuntime)


@dataclass
class ServerState:
    """Counters behind ``/metrics``; touched only on the event loop."""

    semaphore: asyncio.Semaphore
    executor: ThreadPoolExecutor
    in_flight: int = 0
    active: int = 0
    duration_sum_s: float = 0.0
    duration_count: int = 0
    load_started: float = 0.0

    def __post_init__(self) -> None:
        self.by_code: dict[int, int] = {}


STATE_KEY = web.AppKey("state", ServerState)


def _plain(o: Any) -> Any:
    """Make tensors, arrays and numpy scalars serialisable (the usual predict results)."""
    if hasattr(o, "detach") and hasattr(o, "tolist"):
        return o.detach().cpu().tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not serialisable")


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def _health_live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def _health_ready(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME_KEY]
    if rt.ready:
        return web.json_response({"ready": True})
    return web.json_response({"ready": False}, status=503)


async def _call(rt: ModelRuntime, state: ServerState, fn: Any, arg: Any) -> Any:
    if asyncio.iscoroutinefunction(fn):
        return await fn(arg)
    loop = asyncio.get_running_loop()
    result = await loop.run_in_executor(state.executor, fn, arg)
    if asyncio.iscoroutine(result):
        return await result
    return result


async def _predict(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME_KEY]
    state = request.app[STATE_KEY]
    if not rt.ready:
        return _error(503, "the model is still loading")
    binary = request.content_type == MSGPACK_CONTENT_TYPE
    raw = await request.read()
    try:
        if binary:
            body = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        else:
            body = json.loads(raw) if raw.strip() else None
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        kind = "msgpack" if binary else "JSON"
        return _error(400, f"request body is not valid {kind}: {e}")
    t0 = time.perf_counter()
    state.in_flight += 1
    code = 500
    try:
        async with state.semaphore:
            state.active += 1
            try:
                model = rt.model
                value = body
                if callable(getattr(model, "preprocess", None)):
                    value = await _call(rt, state, model.preprocess, value)
                value = await _call(rt, state, model.predict, value)
                if callable(getattr(model, "postprocess", None)):
                    value = await _call(rt, state, model.postprocess, value)
            except Exception as e:
                tb = model_traceback(e, rt.model_dir)
                log.error("predict failed: %s", tb.rstrip())
                return _error(500, f"{type(e).__name__}: {e}", traceback=tb)
            finally:
                state.active -= 1
        try:
            if binary:
                payload = msgpack.packb(value, default=_plain, use_bin_type=True)
                resp = web.Response(body=payload, content_type=MSGPACK_CONTENT_TYPE)
            else:
                resp = web.Response(text=json.dumps(value, default=_plain),
                                    content_type="application/json")
        except (TypeError, ValueError, OverflowError) as e:
            return _error(500, f"the model returned a value that cannot be encoded: {e}")
        code = 200
        return resp
    finally:
        state.in_flight -= 1
        state.by_code[code] = state.by_code.get(code, 0) + 1
        state.duration_sum_s += time.perf_counter() - t0
        state.duration_count += 1


def render_metrics(rt: ModelRuntime, state: ServerState) -> str:
    """Prometheus text exposition of the server's state."""
    cs = rt.cold_start
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:.9g}")

    metric("bdn_model_ready", "gauge", "1 once the model's load() has returned.",
           [("", 1.0 if rt.ready else 0.0)])
    phases = [('{phase="waiting_for_weights"}', cs.waiting_for_weights_s),
              ('{phase="loading_to_device"}', cs.loading_to_device_s)]
    if cs.model_init_s is not None:
        phases.append(('{phase="model_init"}', cs.model_init_s))
    metric("bdn_cold_start_phase_seconds", "gauge",
           "Cold start time by phase: waiting for weights to arrive, loading them to the "
           "device, and the model's own initialisation.", phases)
    total = cs.total_s if cs.total_s is not None else time.perf_counter() - state.load_started
    metric("bdn_cold_start_seconds", "gauge",
           "Wall time of the model's construction and load() (so far, while loading).",
           [("", total)])
    metric("bdn_weights_loaded_bytes", "gauge", "Tensor bytes loaded by the bdn loader.",
           [("", float(cs.bytes_loaded))])
    metric("bdn_requests_in_flight", "gauge",
           "Predict requests received and not yet answered (queued or running).",
           [("", float(state.in_flight))])
    metric("bdn_requests_active", "gauge", "Predict requests running the model now.",
           [("", float(state.active))])
    metric("bdn_predict_concurrency", "gauge", "Most predict requests run at once.",
           [("", float(rt.predict_concurrency))])
    metric("bdn_requests_total", "counter", "Predict requests answered, by status code.",
           [(f'{{code="{c}"}}', float(n)) for c, n in sorted(state.by_code.items())])
    metric("bdn_request_duration_seconds_sum", "counter",
           "Total time spent answering predict requests.", [("", state.duration_sum_s)])
    metric("bdn_request_duration_seconds_count", "counter",
           "Number of predict requests timed.", [("", float(state.duration_count))])
    return "\n".join(lines) + "\n"


async def _metrics(request: web.Request) -> web.Response:
    text = render_metrics(request.app[RUNTIME_KEY], request.app[STATE_KEY])
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type": "text/plain; version=0.0.4"})


def build_app(rt: ModelRuntime) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    state = ServerState(semaphore=asyncio.Semaphore(rt.predict_concurrency),
                        executor=ThreadPoolExecutor(max_workers=rt.predict_concurrency,
                                                    thread_name_prefix="bdn-predict"),
                        load_started=time.perf_counter())
    app[RUNTIME_KEY] = rt
    app[STATE_KEY] = state
    app.router.add_get("/health/live", _health_live)
    app.router.add_get("/health/ready", _health_ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/predict", _predict)

    async def shutdown(app: web.Application) -> None:
        state.executor.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(shutdown)
    return app


def _load_in_thread(rt: ModelRuntime, loop: asyncio.AbstractEventLoop,
                    fut: asyncio.Future[None]) -> None:
    try:
        rt.load()
        err: BaseException | None = None
    except BaseException as e:
        err = e
    with contextlib.suppress(RuntimeError):  # the loop may be gone after a SIGTERM
        loop.call_soon_threadsafe(settle, fut, err)


def run_server(rt: ModelRuntime, listen: ListenAddress) -> int:
    """Bind, announce, load the model in the background, serve until a signal."""

    async def main() -> int:
        app = build_app(rt)
        runner, url = await start_site(app, listen)
        loop = asyncio.get_running_loop()
        stop = signal_stop()
        announce(url)
        loaded: asyncio.Future[None] = loop.create_future()
        threading.Thread(target=_load_in_thread, args=(rt, loop, loaded), daemon=True,
                         name="bdn-model-load").start()
        stopper = asyncio.ensure_future(stop.wait())
        code = 0
        try:
            done, _ = await asyncio.wait({loaded, stopper},
                                         return_when=asyncio.FIRST_COMPLETED)
            if loaded in done:
                exc = loaded.exception()
                if exc is not None:
                    _report_load_failure(exc)
                    code = 1
                else:
                    cs = rt.cold_start
                    log.info("model ready in %.3f s (waiting for weights %.3f s, loading "
                             "to device %.3f s, model init %.3f s)", cs.total_s or 0,
                             cs.waiting_for_weights_s, cs.loading_to_device_s,
                             cs.model_init_s or 0)
                    print(f"{LOADED_PREFIX} {url}", flush=True)
                    await stopper
        finally:
            stopper.cancel()
            if not loaded.done():
                loaded.cancel()
            await runner.cleanup()
        return code

    return asyncio.run(main())


def _report_load_failure(exc: BaseException) -> None:
    if isinstance(exc, ModelLoadError):
        print(f"bdn: error: {exc}", file=sys.stderr)
        if exc.traceback:
            print(exc.traceback.rstrip(), file=sys.stderr)
    else:
        print(f"bdn: error: model load failed: {exc}", file=sys.stderr)
    sys.stderr.flush()
