"""The model server behind ``bdn serve``: HTTP around a :class:`ModelRuntime`.

The process contract the control plane relies on:

* the socket is bound and ``BDN_LISTENING <url>`` printed *before* the model loads, so
  ``GET /health/live`` answers (200) during a cold start and ``GET /health/ready``
  says 503 until ``load()`` has returned, 200 after;
* a failed ``load()`` prints the error with the model's own traceback to stderr and the
  process exits with status 1;
* SIGTERM/SIGINT stop it gracefully (in-flight requests finish, within a bound).

``POST /predict`` (also at Truss's ``/v1/models/model:predict``) takes JSON (or msgpack
when ``Content-Type: application/octet-stream``) and answers in kind. A request runs
Truss's pipeline: ``preprocess`` → ``predict`` → ``postprocess``, each sync (in a thread)
or async; only ``predict`` is under the ``predict_concurrency`` limit, the rest wait in
aiohttp's handler, and pre/post run outside it. When the first of them annotates its
input with a pydantic model, the body is parsed into it (400 with pydantic's errors when
it does not validate). A ``predict`` that returns a generator, sync or async, streams:
each item is written as it is yielded (chunked transfer encoding; ``str`` as UTF-8,
``bytes`` as is), holding the predict slot until the stream ends. A model exception
gives 500 with the traceback of the model's code only (server frames are dropped: they
say nothing to the user, and would leak the server's layout). ``GET /metrics``
(:mod:`bdn.metrics`): readiness, the cold start (histograms of this server's one cold
start, under the names the control plane uses for every replica's), requests in flight
and done.

The model's constructor and ``load()`` run in a daemon thread, so a SIGTERM during a
long load exits at once rather than after the load.

Every request does bounded work (:class:`ServeLimits`): a body larger than
``max_body_bytes`` is refused with 413 (from its ``Content-Length`` before a byte is
read, or as soon as a chunked body passes the limit); a body that has not fully arrived
within ``body_timeout_s`` gets 408, so a slow client cannot hold a queue place for good;
at most ``max_queue`` requests may wait (reading their body, being parsed, or waiting for
a predict slot) and the next gets 429 with ``Retry-After``; input the decoders refuse,
nesting too deep included, is a 400 naming the problem, never a 500. Decoding and
encoding run in a small thread pool of their own, not on the event loop and not in the
predict pool, so a large body neither queues behind predictions nor holds up the loop
between the decoder's calls. (CPython's C decoders hold the GIL for one call, so a body
at the limit can still pause the loop for that call, a fraction of a second at 64 MiB;
``max_body_bytes`` is what bounds that pause.)
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import sys
import threading
import time
import typing
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from aiohttp import web

from bdn import metrics as prom
from bdn.service import (
    LOADED_PREFIX,
    ListenAddress,
    announce,
    settle,
    signal_stop,
    start_site,
)
from serving.errors import ModelLoadError, ServeOptionsError
from serving.runtime import ModelRuntime, model_traceback

log = logging.getLogger("bdn.serving.server")

MSGPACK_CONTENT_TYPE = "application/octet-stream"
# Requests carry model inputs (images, batches of text); aiohttp's 1 MiB default is low,
# and anything much larger belongs in object storage, passed by URL.
MAX_BODY_BYTES_DEFAULT = 64 * (1 << 20)
# A whole body must arrive within this; a slow client gets 408 rather than a queue place.
BODY_TIMEOUT_S_DEFAULT = 60.0
# The default queue: this many waiting requests per predict slot (2 x 8, as the issue
# asks), enough to keep every slot busy through a burst without unbounded memory.
QUEUE_PER_PREDICT_SLOT = 16
# What a 429 asks the client to wait before retrying, in whole seconds (HTTP's unit).
RETRY_AFTER_S = 1
# Threads that decode request bodies and encode responses (not the model's).
CODEC_WORKERS = 2
# Threads for sync preprocess/postprocess, which run outside predict_concurrency: enough
# that they overlap predictions without being a second, hidden concurrency limit that
# matters (a model whose pre/post block longer should make them async).
PRE_POST_WORKERS = 32
# A streamed (generator) response: bytes as the model yields them.
STREAM_CONTENT_TYPE = "application/octet-stream"

RUNTIME_KEY = web.AppKey("runtime", ModelRuntime)


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may cost the server; validated on construction.

    ``max_queue`` None means ``QUEUE_PER_PREDICT_SLOT`` x the model's
    ``predict_concurrency`` (see :meth:`queue_limit`).
    """

    max_body_bytes: int = MAX_BODY_BYTES_DEFAULT
    max_queue: int | None = None
    body_timeout_s: float = BODY_TIMEOUT_S_DEFAULT

    def __post_init__(self) -> None:
        if isinstance(self.max_body_bytes, bool) or self.max_body_bytes < 1:
            raise ServeOptionsError(f"must be at least 1, got {self.max_body_bytes!r}",
                                    field="max_body_bytes")
        if self.max_queue is not None and (isinstance(self.max_queue, bool)
                                           or self.max_queue < 1):
            raise ServeOptionsError(f"must be at least 1, got {self.max_queue!r}",
                                    field="max_queue")
        if not self.body_timeout_s > 0:
            raise ServeOptionsError(f"must be positive, got {self.body_timeout_s!r}",
                                    field="body_timeout_s")

    def queue_limit(self, predict_concurrency: int) -> int:
        if self.max_queue is not None:
            return self.max_queue
        return QUEUE_PER_PREDICT_SLOT * predict_concurrency


class RequestRefused(Exception):
    """A request the server will not run: ``status`` and a sentence for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServerState:
    """Counters behind ``/metrics``; touched only on the event loop."""

    semaphore: asyncio.Semaphore
    executor: ThreadPoolExecutor
    codec: ThreadPoolExecutor
    pre_post: ThreadPoolExecutor
    limits: ServeLimits
    queue_limit: int
    in_flight: int = 0
    active: int = 0
    # Received, not running the model yet: reading the body, parsing, or queued.
    waiting: int = 0
    duration_sum_s: float = 0.0
    duration_count: int = 0
    load_started: float = 0.0

    def __post_init__(self) -> None:
        self.by_code: dict[int, int] = {}


STATE_KEY = web.AppKey("state", ServerState)
REGISTRY_KEY = web.AppKey("metrics_registry", prom.CollectorRegistry)


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
    if hasattr(o, "model_dump"):  # a pydantic model returned by predict
        return o.model_dump(mode="json")
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


async def _call(executor: ThreadPoolExecutor, fn: Any, arg: Any) -> Any:
    """``fn(arg)``: awaited when async (an async generator function's call just returns
    the generator), else run in ``executor``, off the event loop."""
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        result = fn(arg)
    else:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(executor, fn, arg)
    if inspect.isawaitable(result):
        return await result
    return result


async def _read_body(request: web.Request, limits: ServeLimits) -> bytes:
    """The whole body, or :class:`RequestRefused` (413 too large, 408 too slow)."""
    too_large = RequestRefused(413, f"the request body is larger than the server's limit "
                                    f"of {limits.max_body_bytes} bytes")
    length = request.content_length
    if length is not None and length > limits.max_body_bytes:
        raise too_large  # known from the header: not a byte of it is read
    buf = bytearray()
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            while chunk := await request.content.readany():
                if len(buf) + len(chunk) > limits.max_body_bytes:
                    raise too_large
                buf += chunk
    except TimeoutError:
        raise RequestRefused(408, f"the request body did not arrive within "
                                  f"{limits.body_timeout_s:g} s ({len(buf)} bytes came)"
                             ) from None
    return bytes(buf)


def _decode(raw: bytes, binary: bool) -> Any:
    """Parse a request body; any refusal of the decoders is a 400 naming it."""
    kind = "msgpack" if binary else "JSON"
    try:
        if binary:
            return msgpack.unpackb(raw, raw=False, strict_map_key=False)
        return json.loads(raw) if raw.strip() else None
    except RecursionError:
        raise RequestRefused(400, f"request body is not valid {kind}: nested too deeply"
                             ) from None
    except msgpack.StackError:
        raise RequestRefused(400, "request body is not valid msgpack: nested too deeply "
                                  "(at most 1024 levels)") from None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as e:
        # UnicodeDecodeError is a ValueError; msgpack raises TypeError for unhashable keys.
        raise RequestRefused(400, f"request body is not valid {kind}: {e}") from None


def _encode(value: Any, binary: bool) -> web.Response:
    if binary:
        payload = msgpack.packb(value, default=_plain, use_bin_type=True)
        return web.Response(body=payload, content_type=MSGPACK_CONTENT_TYPE)
    return web.Response(text=json.dumps(value, default=_plain),
                        content_type="application/json")


def _refusal(e: RequestRefused) -> web.Response:
    resp = _error(e.status, e.message)
    if e.status == 429:
        resp.headers["Retry-After"] = str(RETRY_AFTER_S)
    if e.status in (408, 413):
        # The rest of the body is unread: close rather than drain it for keep-alive.
        resp.force_close()
    return resp


class _InputInvalid(Exception):
    """The body does not validate against the model's typed (pydantic) input."""

    def __init__(self, message: str, errors: Any) -> None:
        super().__init__(message)
        self.errors = errors


def _input_model(fn: Any) -> Any:
    """The pydantic model class ``fn``'s first parameter is annotated with, or None.

    pydantic stays optional: it is looked up in ``sys.modules``, so it is only there when
    the model's own code imported it (and only such models can annotate with it)."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or fn is None:
        return None
    try:
        params = list(inspect.signature(fn).parameters.values())
        hints = typing.get_type_hints(fn)
    except (TypeError, ValueError, NameError, AttributeError):
        return None
    if not params:
        return None
    ann = hints.get(params[0].name)
    if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
        return ann
    return None


def _validate_input(cls: Any, body: Any) -> Any:
    pydantic = sys.modules["pydantic"]
    try:
        return cls.model_validate(body)
    except pydantic.ValidationError as e:
        errors = json.loads(e.json(include_url=False))
        raise _InputInvalid(f"the input does not validate as {cls.__name__}: "
                            f"{e.error_count()} error(s)", errors) from None


def _is_stream(value: Any) -> bool:
    return inspect.isgenerator(value) or inspect.isasyncgen(value)


def _stream_bytes(item: Any) -> bytes:
    """One item a streaming predict yielded, as bytes on the wire (str as UTF-8, bytes as
    they are, anything else as one line of JSON)."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, str):
        return item.encode("utf-8")
    return (json.dumps(item, default=_plain) + "\n").encode("utf-8")


_END = object()


async def _stream(request: web.Request, rt: ModelRuntime, state: ServerState,
                  gen: Any) -> web.StreamResponse:
    """Write each item as the generator yields it (chunked transfer encoding), so the
    first bytes reach the client while later ones are still being produced."""
    loop = asyncio.get_running_loop()
    resp = web.StreamResponse(status=200, headers={"Content-Type": STREAM_CONTENT_TYPE})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        if inspect.isasyncgen(gen):
            async for item in gen:
                await resp.write(_stream_bytes(item))
        else:
            while (item := await loop.run_in_executor(state.executor, next, gen, _END)) \
                    is not _END:
                await resp.write(_stream_bytes(item))
    except (ConnectionResetError, asyncio.CancelledError):
        # The client went away: stop the model's generator rather than run it to the end.
        if inspect.isasyncgen(gen):
            await gen.aclose()
        else:
            await loop.run_in_executor(state.executor, gen.close)
        raise
    except Exception as e:
        # Status and headers are sent: the only honest signal left is to cut the stream
        # short (no final chunk), which a client sees as a truncated response.
        log.error("streaming predict failed: %s", model_traceback(e, rt.model_dir).rstrip())
        raise
    await resp.write_eof()
    return resp


async def _predict(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME_KEY]
    state = request.app[STATE_KEY]
    if not rt.ready:
        return _error(503, "the model is still loading")
    if state.waiting >= state.queue_limit:
        state.by_code[429] = state.by_code.get(429, 0) + 1
        return _refusal(RequestRefused(
            429, f"the server's queue is full ({state.queue_limit} requests waiting); "
                 "retry later"))
    binary = request.content_type == MSGPACK_CONTENT_TYPE
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    state.in_flight += 1
    state.waiting += 1
    waiting = True
    code = 500
    try:
        try:
            raw = await _read_body(request, state.limits)
            body = await loop.run_in_executor(state.codec, _decode, raw, binary)
            del raw
        except RequestRefused as e:
            code = e.status
            return _refusal(e)
        model = rt.model
        pre = getattr(model, "preprocess", None)
        post = getattr(model, "postprocess", None)
        try:
            typed = _input_model(pre if callable(pre) else model.predict)
            value = body
            if typed is not None:
                value = await loop.run_in_executor(state.codec, _validate_input, typed, value)
            # Pre- and postprocessing run outside the predict_concurrency limit (as in
            # Truss): they are usually I/O or CPU work that should overlap the model.
            if callable(pre):
                value = await _call(state.pre_post, pre, value)
            async with state.semaphore:
                state.waiting -= 1
                waiting = False
                state.active += 1
                try:
                    value = await _call(state.executor, model.predict, value)
                    if _is_stream(value):
                        if callable(post):
                            raise TypeError("predict returned a generator (a stream), and "
                                            "postprocess cannot take a stream; remove "
                                            "postprocess or return a value")
                        # The slot is held until the stream ends: generating is predicting.
                        resp = await _stream(request, rt, state, value)
                        code = 200
                        return resp
                finally:
                    state.active -= 1
            if callable(post):
                value = await _call(state.pre_post, post, value)
        except _InputInvalid as e:
            code = 400
            return _error(400, str(e), errors=e.errors)
        except Exception as e:
            tb = model_traceback(e, rt.model_dir)
            log.error("predict failed: %s", tb.rstrip())
            return _error(500, f"{type(e).__name__}: {e}", traceback=tb)
        try:
            resp = await loop.run_in_executor(state.codec, _encode, value, binary)
        except (TypeError, ValueError, OverflowError, RecursionError) as e:
            return _error(500, f"the model returned a value that cannot be encoded: {e}")
        code = 200
        return resp
    finally:
        if waiting:
            state.waiting -= 1
        state.in_flight -= 1
        state.by_code[code] = state.by_code.get(code, 0) + 1
        state.duration_sum_s += time.perf_counter() - t0
        state.duration_count += 1


def collect_metrics(rt: ModelRuntime, state: ServerState) -> Iterator[prom.Metric]:
    """The server's families (``/metrics``), read from its live state."""
    cs = rt.cold_start
    yield prom.gauge("bdn_model_ready", "1 once the model's load() has returned.",
                     value=1.0 if rt.ready else 0.0)
    # One cold start per process, observed once it is measured (all phases at once).
    done = cs.total_s is not None
    phases = [("waiting_for_weights", cs.waiting_for_weights_s),
              ("loading_to_device", cs.loading_to_device_s),
              ("model_init", cs.model_init_s or 0.0)] if done else []
    yield prom.histogram(
        "bdn_cold_start_phase_seconds",
        "Cold start time by phase: waiting for weights to arrive, loading them to the "
        "device, and the model's own initialisation.", prom.COLD_START_BUCKETS_S,
        [({"phase": name}, prom.bucket_counts(prom.COLD_START_BUCKETS_S, (v,)), v)
         for name, v in phases])
    total = cs.total_s if cs.total_s is not None else 0.0
    yield prom.histogram(
        "bdn_cold_start_seconds", "Wall time of the model's construction and load().",
        prom.COLD_START_BUCKETS_S,
        [({}, prom.bucket_counts(prom.COLD_START_BUCKETS_S, (total,) if done else ()),
          total)])
    elapsed = cs.total_s if done else time.perf_counter() - state.load_started
    yield prom.gauge("bdn_cold_start_elapsed_seconds",
                     "Wall time of the model's construction and load() so far (final "
                     "once ready).", value=elapsed)
    yield prom.gauge("bdn_weights_loaded_bytes", "Tensor bytes loaded by the bdn loader.",
                     value=cs.bytes_loaded)
    yield prom.gauge("bdn_requests_in_flight",
                     "Predict requests received and not yet answered (queued or running).",
                     value=state.in_flight)
    yield prom.gauge("bdn_requests_active", "Predict requests running the model now.",
                     value=state.active)
    yield prom.gauge("bdn_requests_waiting",
                     "Predict requests received and not running the model yet (reading "
                     "their body, being parsed, or waiting for a predict slot).",
                     value=state.waiting)
    yield prom.gauge("bdn_max_queue", "Most requests that may wait; the next gets 429.",
                     value=state.queue_limit)
    yield prom.gauge("bdn_predict_concurrency", "Most predict requests run at once.",
                     value=rt.predict_concurrency)
    yield prom.counter("bdn_requests_total", "Predict requests answered, by status code.",
                       [({"code": str(c)}, n) for c, n in sorted(state.by_code.items())])
    yield prom.summary("bdn_request_duration_seconds",
                       "Time spent answering predict requests.",
                       count=state.duration_count, total=state.duration_sum_s)


async def _metrics(request: web.Request) -> web.Response:
    return prom.metrics_response(request.app[REGISTRY_KEY], request)


def build_app(rt: ModelRuntime, limits: ServeLimits | None = None) -> web.Application:
    limits = limits or ServeLimits()
    app = web.Application(client_max_size=limits.max_body_bytes)
    state = ServerState(semaphore=asyncio.Semaphore(rt.predict_concurrency),
                        executor=ThreadPoolExecutor(max_workers=rt.predict_concurrency,
                                                    thread_name_prefix="bdn-predict"),
                        codec=ThreadPoolExecutor(max_workers=CODEC_WORKERS,
                                                 thread_name_prefix="bdn-codec"),
                        pre_post=ThreadPoolExecutor(max_workers=PRE_POST_WORKERS,
                                                    thread_name_prefix="bdn-prepost"),
                        limits=limits,
                        queue_limit=limits.queue_limit(rt.predict_concurrency),
                        load_started=time.perf_counter())
    app[RUNTIME_KEY] = rt
    app[STATE_KEY] = state
    registry = prom.service_registry()
    registry.register(prom.StateCollector(lambda: collect_metrics(rt, state)))
    app[REGISTRY_KEY] = registry
    app.router.add_get("/health/live", _health_live)
    app.router.add_get("/health/ready", _health_ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/predict", _predict)
    # Truss's (KServe v1) path for the same thing.
    app.router.add_post("/v1/models/model:predict", _predict)

    async def shutdown(app: web.Application) -> None:
        state.executor.shutdown(wait=False, cancel_futures=True)
        state.codec.shutdown(wait=False, cancel_futures=True)
        state.pre_post.shutdown(wait=False, cancel_futures=True)

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


def run_server(rt: ModelRuntime, listen: ListenAddress,
               limits: ServeLimits | None = None) -> int:
    """Bind, announce, load the model in the background, serve until a signal."""

    async def main() -> int:
        app = build_app(rt, limits)
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
