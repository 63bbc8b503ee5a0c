"""Running an aiohttp service the way every bdn daemon does.

One convention for all services: ``--listen HOST:PORT`` (port 0 picks a free port) or
``unix:/path``; once the socket is bound the process prints one line
``BDN_LISTENING <url>`` to stdout. Tests and the demo wait for that line instead of
guessing ports or sleeping; operators see where the service is. SIGTERM and SIGINT stop
the service gracefully (the app's cleanup handlers run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from bdn.errors import BdnError

READY_PREFIX = "BDN_LISTENING"
# ``bdn serve`` also prints ``BDN_READY <url>`` once its model's load() returned.
LOADED_PREFIX = "BDN_READY"
SHUTDOWN_TIMEOUT_S = 10.0


def settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    """End ``fut`` with ``error`` (or a result when None), unless it already ended: the
    first outcome of a transfer or a load is the one that counts."""
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


@dataclass(frozen=True)
class ListenAddress:
    """Where a service listens: TCP ``host``/``port`` or a unix socket ``path``."""

    host: str = "127.0.0.1"
    port: int = 0
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        if text.startswith("unix:"):
            path = text[len("unix:"):]
            if not path:
                raise BdnError("--listen unix: needs a socket path, e.g. unix:/run/bdn.sock")
            return cls(path=path)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
            raise BdnError(f"--listen must be HOST:PORT or unix:PATH, got {text!r}")
        return cls(host=host.strip("[]") or "127.0.0.1", port=int(port))


async def start_site(app: web.Application, listen: ListenAddress) -> tuple[web.AppRunner, str]:
    """Start ``app`` on ``listen``; return the runner and the URL actually bound."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    if listen.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen.path)
        site: web.BaseSite = web.UnixSite(runner, listen.path)
        await site.start()
        return runner, f"unix:{listen.path}"
    site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
    await site.start()
    server = site._server  # aiohttp exposes no public accessor for the bound port
    assert server is not None and server.sockets
    port = server.sockets[0].getsockname()[1]
    host = listen.host if ":" not in listen.host else f"[{listen.host}]"
    return runner, f"http://{host}:{port}"


def announce(url: str) -> None:
    print(f"{READY_PREFIX} {url}", flush=True)
    sys.stdout.flush()


def signal_stop() -> asyncio.Event:
    """An event the running loop sets on SIGTERM or SIGINT: a daemon's "stop now"."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def announce_and_wait(url: str) -> None:
    """Announce ``url`` (the daemon is ready), then wait for SIGTERM or SIGINT."""
    stop = signal_stop()
    announce(url)
    await stop.wait()


def remove_socket_file(listen: ListenAddress) -> None:
    """Remove a unix socket a daemon listened on (after it stopped)."""
    if listen.path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen.path)


def serve_forever(make_app: Callable[[], Awaitable[web.Application]],
                  listen: ListenAddress) -> int:
    """Build the app, bind it, announce the URL and run until SIGTERM/SIGINT."""

    async def main() -> None:
        app = await make_app()
        runner, url = await start_site(app, listen)
        app["bdn.url"] = url
        try:
            await announce_and_wait(url)
        finally:
            await runner.cleanup()
            remove_socket_file(listen)

    asyncio.run(main())
    return 0
