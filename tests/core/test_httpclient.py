"""bdn.httpclient, the one HTTP layer of the synchronous clients, against a real aiohttp
server (on a unix socket in tmp_path, or on loopback TCP) run in a thread of this test:
the unix transport, line-by-line streaming, the one retry loop (a refused connection
then success; idempotent requests only), the error mapping, and no secret in any error
text or log line."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bdn.httpclient import (
    ErrorMap,
    Failure,
    HttpClient,
    HttpError,
    HttpTimeout,
    HttpUnavailable,
    ResponseError,
    redact_url,
    split_url,
    unix_url,
)
from bdn.retry import RetryPolicy
from tests.support.procs import free_port

SECRET = "s3cret-key-never-shown"
WAIT_S = 30.0
# Retries in these tests should not wait: the policy is tested in bdn.retry's own terms.
FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.0, max_delay_s=0.0)


@dataclass
class Api:
    """What the test server saw and the gates its handlers wait on."""

    calls: dict[str, int] = field(default_factory=dict)
    auth: list[str] = field(default_factory=list)
    failures_left: int = 0
    next_line: asyncio.Event | None = None
    hang: asyncio.Event | None = None


def app_for(api: Api) -> web.Application:
    def count(request: web.Request) -> None:
        api.calls[request.path] = api.calls.get(request.path, 0) + 1
        api.auth.append(request.headers.get("Authorization", ""))

    async def echo(request: web.Request) -> web.Response:
        count(request)
        body = await request.json() if request.can_read_body else None
        return web.json_response({"method": request.method, "body": body})

    async def flaky(request: web.Request) -> web.Response:
        count(request)
        if api.failures_left > 0:
            api.failures_left -= 1
            return web.json_response({"error": "starting up"}, status=503,
                                     headers={"Retry-After": "0"})
        return web.json_response({"ok": True})

    async def missing(request: web.Request) -> web.Response:
        count(request)
        return web.json_response({"error": "pull p-1 not found"}, status=404)

    async def plain(request: web.Request) -> web.Response:
        count(request)
        return web.Response(text="teapot here", status=418)

    async def lines(request: web.Request) -> web.StreamResponse:
        # Each line is written only after the reader saw the previous one: a client that
        # buffered the body would wait forever (and the test's bound would fail it).
        count(request)
        assert api.next_line is not None
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(json.dumps({"n": i}).encode() + b"\n")
            await api.next_line.wait()
            api.next_line.clear()
        await resp.write_eof()
        return resp

    async def long_line(request: web.Request) -> web.StreamResponse:
        count(request)
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"x" * 5000)
        await resp.write_eof()
        return resp

    async def hang(request: web.Request) -> web.StreamResponse:
        count(request)
        assert api.hang is not None
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"first\n")
        await api.hang.wait()
        return resp

    async def slow_head(request: web.Request) -> web.Response:
        count(request)
        assert api.hang is not None
        await api.hang.wait()
        return web.json_response({})

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/flaky", flaky)
    app.router.add_post("/flaky", flaky)
    app.router.add_get("/missing", missing)
    app.router.add_get("/plain", plain)
    app.router.add_get("/lines", lines)
    app.router.add_get("/long", long_line)
    app.router.add_get("/hang", hang)
    app.router.add_get("/slow-head", slow_head)
    return app


class Server:
    """An aiohttp server in its own thread and loop; ``call`` runs code on that loop."""

    def __init__(self, api: Api, *, socket_path: str | None = None,
                 port: int | None = None) -> None:
        self.api = api
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self._start(socket_path, port))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)

    def soon(self, fn: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(fn)

    async def _start(self, socket_path: str | None, port: int | None) -> None:
        self.api.next_line = asyncio.Event()
        self.api.hang = asyncio.Event()
        self._runner = web.AppRunner(app_for(self.api))
        await self._runner.setup()
        site: web.BaseSite = (web.UnixSite(self._runner, socket_path) if socket_path
                              else web.TCPSite(self._runner, "127.0.0.1", port or 0))
        await site.start()
        addr = self._runner.addresses[0]
        self.url = unix_url(socket_path) if socket_path else f"http://127.0.0.1:{addr[1]}"

    async def _stop(self) -> None:
        assert self.api.hang is not None and self._runner is not None
        self.api.hang.set()
        await self._runner.cleanup()

    def stop(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT_S)
        self.loop.close()


@pytest.fixture
def tcp() -> Iterator[Server]:
    server = Server(Api())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def unix(tmp_path: Path) -> Iterator[Server]:
    server = Server(Api(), socket_path=str(tmp_path / "api.sock"))
    try:
        yield server
    finally:
        server.stop()


# -- the unix-socket transport -----------------------------------------------------------

def test_httpclient_unix_socket_requests_and_reuses_its_connection(unix: Server,
                                                                  tmp_path: Path) -> None:
    with HttpClient(unix.url) as http:
        assert http.socket_path == str(tmp_path / "api.sock")
        got = http.request("POST", "/echo", json_body={"a": 1}).json()
        assert got == {"method": "POST", "body": {"a": 1}}
        assert http.request("GET", "/echo").json()["method"] == "GET"
    # The explicit option is the same transport.
    with HttpClient("http://localhost", socket_path=str(tmp_path / "api.sock")) as http:
        assert http.request("DELETE", "/echo").json()["method"] == "DELETE"
    assert unix.api.calls["/echo"] == 3


def test_httpclient_unix_socket_missing_is_unavailable(tmp_path: Path) -> None:
    with HttpClient(unix_url(str(tmp_path / "none.sock"))) as http, \
            pytest.raises(HttpUnavailable, match="No such file") as info:
        http.request("GET", "/echo")
    assert info.value.status == 0


# -- streams -----------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_httpclient_stream_yields_each_line_as_it_arrives(transport: str,
                                                          request: pytest.FixtureRequest
                                                          ) -> None:
    server: Server = request.getfixturevalue(transport)
    assert server.api.next_line is not None
    seen = []
    with HttpClient(server.url, timeout_s=WAIT_S) as http, \
            http.stream("GET", "/lines", read_timeout_s=WAIT_S) as resp:
        assert resp.status == 200 and resp.content_type == "application/x-ndjson"
        for line in resp.lines():
            seen.append(json.loads(line)["n"])
            server.soon(server.api.next_line.set)  # only now may the next line come
    assert seen == [0, 1, 2]


def test_httpclient_stream_line_over_its_bound_is_refused(tcp: Server) -> None:
    with HttpClient(tcp.url) as http, http.stream("GET", "/long") as resp, \
            pytest.raises(ResponseError, match="exceeds 1000 bytes"):
        list(resp.lines(max_line_bytes=1000))


def test_httpclient_stream_abort_wakes_a_blocked_reader(tcp: Server) -> None:
    got: list[bytes] = []
    first = threading.Event()
    errors: list[BaseException] = []
    with HttpClient(tcp.url) as http:
        resp = http.stream("GET", "/hang", read_timeout_s=None)

        def read() -> None:
            try:
                for line in resp.lines():
                    got.append(line)
                    first.set()
            except BaseException as e:  # reported to the test below
                errors.append(e)

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(WAIT_S)
        resp.abort()
        reader.join(WAIT_S)
        assert not reader.is_alive()
        resp.close()
    assert got == [b"first\n"]
    assert all(isinstance(e, HttpUnavailable) for e in errors)


def test_httpclient_waiting_for_headers_times_out_as_timeout_error(tcp: Server) -> None:
    with HttpClient(tcp.url, timeout_s=0.3) as http, pytest.raises(TimeoutError) as info:
        http.stream("GET", "/slow-head")
    assert isinstance(info.value, HttpTimeout) and "timed out" in str(info.value)


# -- the one retry loop ------------------------------------------------------------------

def test_httpclient_retries_a_refused_connection_then_succeeds() -> None:
    port = free_port()
    started: list[Server] = []
    failures: list[Failure] = []

    def on_retry(attempt: int, failure: Failure, delay_s: float) -> None:
        failures.append(failure)
        if not started:  # the server comes up only after the first refusal
            started.append(Server(Api(), port=port))

    try:
        with HttpClient(f"http://127.0.0.1:{port}", retry=FAST_RETRY,
                        on_retry=on_retry) as http:
            # A POST without an Idempotency-Key: a connection never opened sent nothing.
            assert http.request("POST", "/echo", json_body={}).json()["method"] == "POST"
    finally:
        for s in started:
            s.stop()
    assert len(failures) == 1 and failures[0].status == 0
    assert "refused" in failures[0].message.lower()


def test_httpclient_retries_idempotent_requests_on_retryable_status(tcp: Server) -> None:
    tcp.api.failures_left = 2
    with HttpClient(tcp.url, retry=FAST_RETRY) as http:
        assert http.request("GET", "/flaky").json() == {"ok": True}
    assert tcp.api.calls["/flaky"] == 3


def test_httpclient_does_not_repeat_a_post_that_was_answered(tcp: Server) -> None:
    tcp.api.failures_left = 5
    with HttpClient(tcp.url, retry=FAST_RETRY) as http:
        with pytest.raises(HttpError) as info:
            http.request("POST", "/flaky", json_body={})
        assert info.value.status == 503 and tcp.api.calls["/flaky"] == 1
        # Under an Idempotency-Key (or declared idempotent) it is safe to repeat.
        tcp.api.failures_left = 1
        assert http.request("POST", "/flaky", json_body={},
                            headers={"Idempotency-Key": "k1"}).json() == {"ok": True}
        tcp.api.failures_left = 1
        assert http.request("POST", "/flaky", json_body={}, idempotent=True).json()["ok"]
    assert tcp.api.calls["/flaky"] == 5


def test_httpclient_gives_up_after_the_policys_attempts(tcp: Server) -> None:
    tcp.api.failures_left = 10
    with HttpClient(tcp.url, retry=FAST_RETRY) as http, pytest.raises(HttpError) as info:
        http.request("GET", "/flaky")
    assert info.value.status == 503 and "starting up" in str(info.value)
    assert tcp.api.calls["/flaky"] == FAST_RETRY.attempts


def test_httpclient_without_a_policy_makes_one_attempt(tcp: Server) -> None:
    tcp.api.failures_left = 1
    with HttpClient(tcp.url) as http:
        assert http.request("GET", "/flaky", ok=lambda s: True).status == 503
    assert tcp.api.calls["/flaky"] == 1


# -- the one error mapping ---------------------------------------------------------------

class NotThere(Exception):
    pass


class Down(Exception):
    pass


def test_httpclient_error_map_turns_status_and_json_error_into_callers_errors(
        tcp: Server) -> None:
    errors = ErrorMap(statuses={404: lambda f: NotThere(f"gone: {f.message}")},
                      unavailable=lambda f: Down(f"down: {f.message}"))
    with HttpClient(tcp.url, errors=errors) as http:
        with pytest.raises(NotThere, match=r"^gone: pull p-1 not found$"):
            http.request("GET", "/missing")
        # Unmapped statuses fall back to the layer's own error, with the body's text.
        with pytest.raises(HttpError, match="HTTP 418: teapot here") as info:
            http.request("GET", "/plain")
        assert info.value.status == 418 and info.value.reason == "teapot here"
    with HttpClient(f"http://127.0.0.1:{free_port()}", errors=errors) as http, \
            pytest.raises(Down, match=r"down: .*refused"):
        http.request("GET", "/echo")


def test_httpclient_refuses_a_url_it_cannot_speak() -> None:
    with pytest.raises(HttpError, match="not an http://"):
        HttpClient("ftp://example/x")


def test_httpclient_urls_split_and_redact() -> None:
    assert split_url("http://h:1/a/b?c=d") == ("http://h:1", "/a/b?c=d")
    assert split_url(unix_url("/run/a.sock", "/v1")) == ("http+unix://%2Frun%2Fa.sock",
                                                          "/v1")
    assert redact_url("http://user:pw@h:1/x") == "http://h:1/x"


# -- secrets -----------------------------------------------------------------------------

def test_httpclient_no_secret_in_error_text_or_logs(tcp: Server,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = tcp.url.rsplit(":", 1)[1]
    texts: list[str] = []
    with HttpClient(f"http://admin:{SECRET}@127.0.0.1:{port}",
                    headers={"Authorization": f"Api-Key {SECRET}"}, retry=FAST_RETRY) as http:
        texts.append(repr(http))
        assert http.request("GET", "/echo").status == 200
        for target in ("/missing", "/plain"):
            with pytest.raises(HttpError) as info:
                http.request("GET", target)
            texts += [str(info.value), repr(info.value), info.value.url]
    assert tcp.api.auth[0] == f"Api-Key {SECRET}"  # it was sent
    closed = free_port()
    with HttpClient(f"http://admin:{SECRET}@127.0.0.1:{closed}",
                    headers={"Authorization": f"Api-Key {SECRET}",
                             "X-Bdn-Pull-Token": SECRET}, retry=FAST_RETRY) as http, \
            pytest.raises(HttpUnavailable) as down:
        http.request("GET", "/echo")
    texts += [str(down.value), repr(down.value)]
    texts += [r.getMessage() for r in caplog.records]
    assert texts and not [t for t in texts if SECRET in t]


def test_httpclient_errors_are_bdn_errors_and_builtin_kinds() -> None:
    from bdn.errors import BdnError
    assert issubclass(HttpError, BdnError)
    assert issubclass(HttpUnavailable, ConnectionError)
    assert issubclass(HttpTimeout, TimeoutError)
    assert issubclass(ResponseError, ValueError)
