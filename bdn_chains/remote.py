"""A chainlet in a bdn replica: stubs for its dependencies, and errors that bubble up.

The generated ``model/model.py`` of a chainlet deployment (``bdn_chains.codegen``)
builds its chainlet through :class:`ChainletHost`: each dependency becomes a
:class:`Stub` whose ``run_remote`` posts the arguments to the control plane's chain
route for that chainlet (``/chains/{chain}/deployment/{chain_deployment}/chainlets/
{name}/run_remote``), so a call is routed, queued, autoscaled and cold-started like any
request to a deployment. Where the control plane is comes from the replica's environment
(:data:`URL_ENV`, :data:`KEY_ENV`, set by the control server, never stored with the
deployment); which chain deployment it belongs to from :data:`CHAIN_ENV`.

A ``run_remote`` that raises returns a :class:`RemoteErrorDetail` (HTTP 500, body
``{"error": {...}}``); the caller's stub re-raises the same builtin exception class, or
:class:`GenericRemoteException`, with the dependency's "Chainlet-Traceback" chained into
the message, as the seed documentation shows. Retries (``depends(retries=N)``) repeat a
call that failed in transport (connection refused or reset, 502/503/504), never one the
dependency answered with an exception: re-running user code that raised is the caller's
decision (catch and call again). A synchronous call goes through :mod:`bdn.httpclient`
(its one retry loop, with :mod:`bdn.retry`'s backoff between attempts).
"""

from __future__ import annotations

import asyncio
import builtins
import codecs
import json
import threading
import traceback
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import msgpack
import pydantic

from bdn import settings
from bdn.httpclient import ErrorMap, Failure, HttpClient, split_url
from bdn.retry import RetryPolicy
from bdn_chains.framework import (
    REGISTRY,
    ContextMarker,
    DependencyMarker,
    DeploymentContext,
    GenericRemoteException,
    RemoteErrorDetail,
    RPCOptions,
    StackFrame,
    provided,
)

URL_ENV = settings.CHAINS_URL.name
KEY_ENV = settings.CHAINS_API_KEY.name
CHAIN_ENV = settings.CHAIN_ID.name
CHAIN_DEPLOYMENT_ENV = settings.CHAIN_DEPLOYMENT_ID.name
ERROR_KEY = "error"
MSGPACK_CONTENT_TYPE = "application/octet-stream"
RETRYABLE_STATUS = frozenset({502, 503, 504})
TRANSPORT_ERROR_STATUS = 500


class ChainletFailed(Exception):
    """Raised by a chainlet's generated ``predict``: its string is the error detail JSON,
    which the control plane's chain route turns back into ``{"error": {...}}``."""

    MARKER = "ChainletFailed: "

    def __init__(self, detail: RemoteErrorDetail) -> None:
        super().__init__(detail.model_dump_json())
        self.detail = detail


def error_detail(exc: BaseException, chainlet: str) -> RemoteErrorDetail:
    """The structured form of an exception raised in a chainlet's ``run_remote``.

    Frames of bdn's own machinery are left out: they say nothing about the user's code."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "bdn_chains" not in f.filename and "/serving/" not in f.filename
              and not f.filename.endswith("model/model.py")]
    return RemoteErrorDetail(
        exception_cls_name=type(exc).__name__,
        exception_module_name=type(exc).__module__,
        exception_message=str(exc),
        user_stack_trace=[StackFrame(filename=f.filename, lineno=f.lineno, name=f.name,
                                     line=f.line) for f in frames],
        chainlet=chainlet)


def _indent(text: str) -> str:
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        out.append(("╰ " if i == len(lines) - 1 else "│ ") + line)
    return "\n".join(out)


def reraise(detail: RemoteErrorDetail, chainlet: str) -> BaseException:
    """The exception a caller raises for a dependency's error (same builtin class)."""
    message = ("(showing chained remote errors, root error at the bottom)\n"
               f"├─ Error in dependency Chainlet `{chainlet}`:\n" + _indent(detail.format()))
    cls = getattr(builtins, detail.exception_cls_name, None)
    if (detail.exception_module_name == "builtins" and isinstance(cls, type)
            and issubclass(cls, Exception)):
        try:
            return cls(message)
        except TypeError:  # a builtin whose constructor takes other arguments
            pass
    return GenericRemoteException(f"{detail.exception_cls_name}: {message}")


def _encode(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="python")
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


class Stub:
    """A dependency as its caller sees it: ``run_remote`` over HTTP, sync or async."""

    def __init__(self, name: str, url: str, api_key: str | None, options: RPCOptions,
                 output: Any, is_async: bool, stream_item: type | None = None) -> None:
        self.name = name
        self.stream_item = stream_item
        self.url = url
        self.api_key = api_key
        self.options = options
        self._output = (pydantic.TypeAdapter(output)
                        if output is not None and stream_item is None else None)
        self._is_async = is_async
        self._session: aiohttp.ClientSession | None = None
        self._http: HttpClient | None = None
        self._http_lock = threading.Lock()

    def _request(self, kwargs: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
        headers = {}
        if self.api_key:
            headers["Authorization"] = f"Api-Key {self.api_key}"
        if self.options.use_binary:
            headers["Content-Type"] = MSGPACK_CONTENT_TYPE
            return msgpack.packb(_encode(dict(kwargs)), use_bin_type=True), headers
        headers["Content-Type"] = "application/json"
        return json.dumps(dict(kwargs), default=_json_default).encode(), headers

    def _answer(self, status: int, content_type: str, body: bytes) -> Any:
        binary = content_type.startswith(MSGPACK_CONTENT_TYPE)
        try:
            doc = msgpack.unpackb(body, raw=False) if binary else json.loads(body)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError) as e:
            raise GenericRemoteException(
                f"chainlet {self.name} answered {status} with a body that is not "
                f"{'msgpack' if binary else 'JSON'}: {body[:200]!r}") from e
        if status >= 400:
            err = doc.get(ERROR_KEY) if isinstance(doc, dict) else None
            if isinstance(err, dict):
                raise reraise(RemoteErrorDetail.model_validate(err), self.name)
            raise GenericRemoteException(f"chainlet {self.name} failed with HTTP {status}: "
                                         f"{err if err is not None else doc}")
        return self._output.validate_python(doc) if self._output is not None else doc

    async def _call_async(self, kwargs: Mapping[str, Any]) -> Any:
        data, headers = self._request(kwargs)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0))
        timeout = aiohttp.ClientTimeout(total=self.options.timeout_sec)
        last: BaseException | None = None
        for _ in range(self.options.retries):
            try:
                async with self._session.post(self.url, data=data, headers=headers,
                                              timeout=timeout) as resp:
                    body = await resp.read()
                    if resp.status in RETRYABLE_STATUS:
                        last = GenericRemoteException(
                            f"chainlet {self.name} unavailable (HTTP {resp.status}): "
                            f"{body[:200]!r}")
                        continue
                    return self._answer(resp.status, resp.content_type, body)
            except (aiohttp.ClientConnectionError, TimeoutError) as e:
                last = e
        assert last is not None
        raise last

    def _client(self) -> HttpClient:
        with self._http_lock:
            if self._http is None:
                def unavailable(f: Failure) -> GenericRemoteException:
                    return GenericRemoteException(
                        f"chainlet {self.name} unavailable (HTTP {f.status}): "
                        f"{f.body[:200]!r}")

                # ``retries`` counts attempts; a user's opt-in makes the POST repeatable.
                self._http = HttpClient(
                    split_url(self.url)[0], timeout_s=self.options.timeout_sec,
                    retry=RetryPolicy(attempts=self.options.retries),
                    retry_status=RETRYABLE_STATUS.__contains__,
                    errors=ErrorMap(other=unavailable))
            return self._http

    def _call_sync(self, kwargs: Mapping[str, Any]) -> Any:
        data, headers = self._request(kwargs)
        # Every answer but a transport status (502/503/504, retried) is the dependency's.
        resp = self._client().request("POST", split_url(self.url)[1], body=data,
                                      headers=headers, idempotent=True,
                                      ok=lambda status: True)
        return self._answer(resp.status, resp.content_type, resp.body)

    async def _stream(self, kwargs: Mapping[str, Any]) -> AsyncIterator[Any]:
        """A streaming dependency: its chunks as they arrive (no retry once begun)."""
        data, headers = self._request(kwargs)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        timeout = aiohttp.ClientTimeout(total=self.options.timeout_sec)
        async with self._session.post(self.url, data=data, headers=headers,
                                      timeout=timeout) as resp:
            if resp.status >= 400:
                self._answer(resp.status, resp.content_type, await resp.read())
            decoder = codecs.getincrementaldecoder("utf-8")()
            async for chunk in resp.content.iter_any():
                if self.stream_item is bytes:
                    yield chunk
                elif text := decoder.decode(chunk):
                    yield text
            if self.stream_item is not bytes and (rest := decoder.decode(b"", final=True)):
                yield rest

    def run_remote(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise TypeError(f"{self.name}.run_remote takes keyword arguments or positional "
                            "ones matching its signature")
        if self.stream_item is not None:
            return self._stream(kwargs)
        if self._is_async:
            return self._call_async(kwargs)
        return self._call_sync(kwargs)


class _PositionalStub:
    """Maps positional arguments onto the dependency's ``run_remote`` parameter names."""

    def __init__(self, stub: Stub, names: tuple[str, ...]) -> None:
        self._stub = stub
        self._names = names

    def run_remote(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(self._names):
            raise TypeError(f"{self._stub.name}.run_remote takes {len(self._names)} "
                            f"arguments, got {len(args)}")
        kwargs.update(zip(self._names, args, strict=False))
        return self._stub.run_remote(**kwargs)


def chain_url(base: str, chain_id: str, chain_deployment_id: str, chainlet: str) -> str:
    return (f"{base.rstrip('/')}/chains/{chain_id}/deployment/{chain_deployment_id}"
            f"/chainlets/{chainlet}/run_remote")


class ChainletHost:
    """Builds one chainlet in a replica and runs its ``run_remote`` for ``predict``."""

    def __init__(self, cls: type, *, secrets: Mapping[str, str] | None = None,
                 data_dir: Any = None, environment: Any = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.desc = REGISTRY.get(cls)
        self.name = self.desc.name
        base = settings.CHAINS_URL.get(env)
        chain_id = settings.CHAIN_ID.get(env)
        chain_dep = settings.CHAIN_DEPLOYMENT_ID.get(env)
        api_key = settings.CHAINS_API_KEY.get(env)
        self.context = DeploymentContext(data_dir=data_dir, secrets=dict(secrets or {}),
                                         environment=environment)

        def provide(marker: Any) -> Any:
            if isinstance(marker, ContextMarker):
                return self.context
            assert isinstance(marker, DependencyMarker)
            dep = REGISTRY.get(marker.chainlet_cls)
            if not base:
                raise GenericRemoteException(
                    f"this replica was not told where the control plane is ({URL_ENV}); "
                    f"it cannot call chainlet {dep.name}")
            run = marker.chainlet_cls.run_remote
            output = _return_type(run)
            stub = Stub(dep.name, chain_url(base, chain_id, chain_dep, dep.name),
                        api_key, marker.options, output, dep.is_async,
                        dep.stream_item)
            return _PositionalStub(stub, dep.input_names)

        with provided(provide):
            self.chainlet = cls()
        self._inputs = _input_adapters(cls.run_remote)
        self.input_model = _input_model(self.name, cls.run_remote)

    def typed_predict(self) -> Any:
        """``predict`` annotated with the request model of ``run_remote``'s arguments:
        the serving runtime validates a request into it (400 naming the fields) before
        the chainlet runs."""
        if self.desc.is_async:
            async def predict(model_input: Any) -> Any:
                return await self.predict_async(model_input)
        else:
            def predict(model_input: Any) -> Any:
                return self.predict_sync(model_input)
        predict.__annotations__ = {"model_input": self.input_model, "return": Any}
        return predict

    def _arguments(self, body: Any) -> dict[str, Any]:
        if isinstance(body, self.input_model):
            return {k: getattr(body, k) for k in type(body).model_fields}
        if not isinstance(body, dict):
            raise TypeError(f"the request body must be an object keyed by {self.name}."
                            f"run_remote's arguments {list(self.desc.input_names)}")
        unknown = set(body) - set(self.desc.input_names)
        if unknown:
            raise TypeError(f"{self.name}.run_remote has no argument(s) {sorted(unknown)}")
        return {k: self._inputs[k].validate_python(v) for k, v in body.items()}

    async def predict_async(self, body: Any) -> Any:
        if self.desc.stream_item is not None:
            # The server streams an async generator as it yields; an error before the
            # first item still fails the request (500), a later one cuts the stream.
            try:
                return self.chainlet.run_remote(**self._arguments(body))
            except Exception as e:
                raise ChainletFailed(error_detail(e, self.name)) from None
        try:
            result = await self.chainlet.run_remote(**self._arguments(body))
        except Exception as e:
            raise ChainletFailed(error_detail(e, self.name)) from None
        return result  # the server encodes pydantic models (JSON or msgpack, as asked)

    def predict_sync(self, body: Any) -> Any:
        try:
            result = self.chainlet.run_remote(**self._arguments(body))
        except Exception as e:
            raise ChainletFailed(error_detail(e, self.name)) from None
        return result  # the server encodes pydantic models (JSON or msgpack, as asked)


def _return_type(func: Any) -> Any:
    import typing
    hints = typing.get_type_hints(func)
    return hints.get("return")


def _input_model(name: str, func: Any) -> type[pydantic.BaseModel]:
    import inspect
    import typing
    hints = typing.get_type_hints(func)
    fields: dict[str, Any] = {}
    for p in list(inspect.signature(func).parameters.values())[1:]:
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints[p.name], default)
    return pydantic.create_model(  # type: ignore[call-overload, no-any-return]
        f"{name}Input", __config__=pydantic.ConfigDict(extra="forbid",
                                                     arbitrary_types_allowed=True),
        **fields)


def _input_adapters(func: Any) -> dict[str, pydantic.TypeAdapter[Any]]:
    import inspect
    import typing
    hints = typing.get_type_hints(func)
    names = list(inspect.signature(func).parameters)[1:]
    return {n: pydantic.TypeAdapter(hints[n]) for n in names}


def run_coroutine(coro: Any) -> Any:
    """Run a coroutine from sync code (used only by tests and tools)."""
    return asyncio.run(coro)
