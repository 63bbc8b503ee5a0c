"""A dependency stub against a real HTTP server on loopback: retries on transport
failures only (503 then success; a dependency's exception is never retried), the
timeout bound, and the documented re-raise of a dependency's error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from bdn_chains import GenericRemoteException, RemoteErrorDetail, RPCOptions
from bdn_chains.remote import Stub, reraise


class Flaky:
    """Answers 503 ``failures`` times, then the result; counts calls."""

    def __init__(self, failures: int, error: dict[str, Any] | None = None) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.json()
        if request.query.get("hang"):
            await self.release.wait()
        if self.calls <= self.failures:
            return web.json_response({"error": "starting"}, status=503)
        if self.error is not None:
            return web.json_response({"error": self.error}, status=500)
        return web.json_response(body["x"] * 2)


async def serve(flaky: Flaky) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/run", flaky.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/run"
    finally:
        flaky.release.set()
        await runner.cleanup()


def run(flaky: Flaky, retries: int, *, timeout_sec: float = 30, query: str = "",
        is_async: bool = True) -> Any:
    async def main() -> Any:
        gen = serve(flaky)
        url = await gen.__anext__()
        stub = Stub("Dep", url + query, None, RPCOptions(retries=retries,
                                                         timeout_sec=timeout_sec), int,
                    is_async)
        try:
            if is_async:
                return await stub.run_remote(x=21)
            return await asyncio.to_thread(stub.run_remote, x=21)
        finally:
            if stub._session is not None:
                await stub._session.close()
            await gen.aclose()
    return asyncio.run(main())


@pytest.mark.parametrize("is_async", [True, False])
def test_transport_failures_are_retried(is_async: bool) -> None:
    flaky = Flaky(failures=2)
    assert run(flaky, retries=3, is_async=is_async) == 42
    assert flaky.calls == 3


def test_retries_run_out() -> None:
    flaky = Flaky(failures=5)
    with pytest.raises(GenericRemoteException, match="HTTP 503"):
        run(flaky, retries=2)
    assert flaky.calls == 2


def test_a_dependency_exception_is_not_retried_and_reraised() -> None:
    detail = RemoteErrorDetail(exception_cls_name="KeyError", exception_module_name="builtins",
                               exception_message="'k'", chainlet="Dep")
    flaky = Flaky(failures=0, error=json.loads(detail.model_dump_json()))
    with pytest.raises(KeyError, match="Error in dependency Chainlet `Dep`"):
        run(flaky, retries=3)
    assert flaky.calls == 1


def test_timeout_bounds_a_call() -> None:
    flaky = Flaky(failures=0)
    with pytest.raises(TimeoutError):
        run(flaky, retries=1, timeout_sec=0.5, query="?hang=1")


def test_reraise_maps_builtin_and_custom_classes() -> None:
    builtin = reraise(RemoteErrorDetail(exception_cls_name="ValueError",
                                        exception_module_name="builtins",
                                        exception_message="bad"), "Dep")
    assert type(builtin) is ValueError
    assert "Chainlet-Traceback (most recent call last):" in str(builtin)
    assert str(builtin).splitlines()[-1] == "╰ ValueError: bad"
    custom = reraise(RemoteErrorDetail(exception_cls_name="ShoutError",
                                       exception_module_name="mychain",
                                       exception_message="no"), "Dep")
    assert type(custom) is GenericRemoteException

