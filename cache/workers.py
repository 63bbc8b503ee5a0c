"""``bdn cache-server --workers N``: one cache folder served by several processes.

Why: a warm hit costs the server some Python per request (tens of µs on the fast path,
:mod:`cache.fastpath`) besides the kernel's ``sendfile`` work, and one Python process
runs all of it on one core, so
a pod with more cores than one event loop can keep busy needs more processes (nginx runs
a worker per core). The server the operator starts — the *owner* — starts N − 1 hit
workers (:mod:`cache.worker`) that listen on the same port with ``SO_REUSEPORT`` beside
it, and the kernel spreads connections over the N processes. What it does not do is
lower the CPU each request costs: where the cores are already saturated (the 2-core
loopback benchmark, clients included) N processes serve about what one does.

What must happen once per cache folder stays in the owner, this process: the folder lock
and the LMDB index (:mod:`cache.disk`), fills (single flight: every miss of every process
ends up here, so the blob store sees one read per object however many clients of however
many processes ask), eviction, prefetch, refs, ``/metrics``. Workers only read complete
object files and forward everything else to the owner over a private abstract unix
socket (the same HTTP app as the public port). A miss a worker took is streamed to it by
the owner and relayed on with ``splice``: that relay is the CPU this design costs.

What the owner must know of the hits workers serve: pins, so an object a worker is
sending is not chosen for eviction (its open descriptor would keep the bytes readable
anyway, but the disk budget would not hold) — a shared ``flock`` on the open file, which
the owner's eviction respects (:mod:`cache.disk`) and the kernel drops when a worker
dies, so no message per request; and hits, bytes served and access times (the LRU),
which workers batch over their control ``socketpair`` every ``NOTES_INTERVAL_S`` (see
:mod:`cache.worker`). Before answering ``/metrics`` the owner collects every worker's
pending notes; a worker counts a hit before the response's first byte, so ``/metrics``
read after a response completed includes it. The LRU sees a worker's accesses up to
``NOTES_INTERVAL_S`` late. Per-process figures are in
``bdn_cache_process_{hits,bytes_served}_total{worker="i"}`` (0: the owner), and every
object response names its process in ``X-Bdn-Worker``.

Lifetime: workers are the owner's children and die with it (``PR_SET_PDEATHSIG`` and
the end of their control socket). SIGTERM to the owner is passed on to them and the
owner waits for them before it exits. A worker that dies is replaced after
``WORKER_RESPAWN_DELAY_S`` (its pins went with it: the kernel drops its locks).

Caveat of ``SO_REUSEPORT``: another process of the same user that also sets it can bind
the same port and would share its connections instead of failing to start — give each
server its own port (a pod has its own network namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys

from aiohttp import web

from bdn.service import (
    SHUTDOWN_TIMEOUT_S,
    ListenAddress,
    announce_and_wait,
    remove_socket_file,
)
from bdn.store import BlobStore
from cache.disk import OBJECTS_DIR
from cache.edge import raise_fd_limit
from cache.errors import WorkerError
from cache.server import CacheServer, CacheServerOptions
from cache.worker import LINE_ENCODING, ControlLines, WorkerOptions
from manifests.errors import DigestError

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 60.0
# A worker's own graceful stop waits up to SHUTDOWN_TIMEOUT_S for in-flight requests.
WORKER_STOP_TIMEOUT_S = SHUTDOWN_TIMEOUT_S + 5.0
WORKER_RESPAWN_DELAY_S = 1.0
# /metrics waits at most this long for a worker's pending notes.
WORKER_SYNC_TIMEOUT_S = 2.0
FORWARD_BACKLOG = 1024


class WorkerLink(ControlLines):
    """The owner's end of one worker's control socket (lines, see :mod:`cache.worker`)."""

    def __init__(self, pool: WorkerPool, index: int,
                 proc: asyncio.subprocess.Process) -> None:
        super().__init__()
        self.pool = pool
        self.index = index
        self.proc = proc
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[int] = loop.create_future()
        self._syncs: dict[int, asyncio.Future[None]] = {}
        self._next_sync = 0

    def line_received(self, line: bytes) -> None:
        try:
            self._handle(line.decode(LINE_ENCODING))
        except (ValueError, DigestError) as e:
            log.warning("cache worker %d sent a bad line %r: %s", self.index, line, e)

    def _handle(self, line: str) -> None:
        server = self.pool.server
        kind, _, rest = line.partition(" ")
        if kind == "A":
            hex_, _, at = rest.partition(" ")
            server.worker_access(hex_, float(at))
        elif kind == "C":
            hits, _, nbytes = rest.partition(" ")
            server.worker_counts(self.index, int(hits), int(nbytes))
        elif kind == "s":
            fut = self._syncs.pop(int(rest), None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == "R":
            if not self.ready.done():
                self.ready.set_result(int(rest))
        else:
            raise ValueError(f"unknown kind {kind!r}")

    def sync(self) -> asyncio.Future[None]:
        """Resolved once the worker has sent every note it had when asked."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.send(f"S {self._next_sync + 1}\n"):
            fut.set_result(None)
            return fut
        self._next_sync += 1
        self._syncs[self._next_sync] = fut
        return fut

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for fut in self._syncs.values():  # a dead worker has nothing more to say
            if not fut.done():
                fut.set_result(None)
        self._syncs.clear()
        if not self.ready.done():
            self.ready.set_exception(WorkerError(
                f"cache worker {self.index} (pid {self.proc.pid}) exited before it was "
                "ready"))
            self.ready.exception()  # retrieved here; start() reports it
        self.pool._lost(self)


class WorkerPool:
    """The owner's N − 1 hit workers: started, watched, replaced, stopped."""

    def __init__(self, server: CacheServer, count: int, forward_socket: str, *,
                 host: str = "", port: int = 0, listen_fd: int = -1) -> None:
        self.server = server
        self.count = count
        self.forward_socket = forward_socket
        self.host = host
        self.port = port
        self.listen_fd = listen_fd
        self.links: dict[int, WorkerLink] = {}
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def collect_notes(self) -> None:
        """Have every worker's pending notes (hits, bytes, accesses) applied here."""
        syncs = [link.sync() for link in self.links.values() if link.ready.done()]
        if not syncs:
            return
        _, pending = await asyncio.wait(syncs, timeout=WORKER_SYNC_TIMEOUT_S)
        if pending:
            log.warning("%d cache worker(s) did not send their notes within %.0f s; "
                        "/metrics leaves their latest hits out", len(pending),
                        WORKER_SYNC_TIMEOUT_S)

    async def start(self) -> None:
        """Start every worker; return once all listen (or raise :class:`WorkerError`)."""
        results = await asyncio.gather(*(self._spawn(i) for i in range(1, self.count)),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _spawn(self, index: int, *, replacing: bool = False) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            options = WorkerOptions(
                index=index, owner_pid=os.getpid(), control_fd=theirs.fileno(),
                forward_socket=self.forward_socket,
                objects_dir=str(self.server.disk.root / OBJECTS_DIR),
                send_threads=self.server.options.send_threads,
                edge=self.server.options.edge, host=self.host,
                port=self.port, listen_fd=self.listen_fd,
                log_level=logging.getLogger().getEffectiveLevel())
            fds = (theirs.fileno(), *((self.listen_fd,) if self.listen_fd >= 0 else ()))
            # Forked from the event loop (main) thread: PR_SET_PDEATHSIG follows the
            # thread that forked, and this one lives as long as the process.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cache.worker", *options.argv(), pass_fds=fds,
                stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        link = WorkerLink(self, index, proc)
        await loop.connect_accepted_socket(lambda: link, ours)
        self.links[index] = link
        try:
            pid = await asyncio.wait_for(asyncio.shield(link.ready), WORKER_START_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise WorkerError(f"cache worker {index} (pid {proc.pid}) did not start "
                              f"within {WORKER_START_TIMEOUT_S:.0f} s") from None
        self.server.processes[index] = pid
        log.log(logging.WARNING if replacing else logging.INFO,
                "cache worker %d listening (pid %d)%s", index, pid,
                " in place of the one that exited" if replacing else "")

    def _lost(self, link: WorkerLink) -> None:
        if self.links.get(link.index) is link:
            del self.links[link.index]
        self.server.processes.pop(link.index, None)
        if self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self._replace(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, link: WorkerLink) -> None:
        rc = await link.proc.wait()
        if not link.ready.done() or link.ready.exception() is not None:
            return  # it never started: start() reports that
        while True:
            await asyncio.sleep(WORKER_RESPAWN_DELAY_S)  # (and the owner may be stopping)
            if self._stopping:
                return
            log.warning("cache worker %d (pid %d) exited with %s; starting another",
                        link.index, link.proc.pid, rc)
            try:
                await self._spawn(link.index, replacing=True)
                return
            except WorkerError as e:
                log.warning("%s", e)

    def stop(self) -> None:
        """Ask every worker to stop (SIGTERM: they finish in-flight responses)."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for link in self.links.values():
            if link.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    link.proc.send_signal(signal.SIGTERM)

    async def wait(self) -> None:
        """Wait for every worker to exit (killing any that takes too long)."""
        for link in list(self.links.values()):
            try:
                await asyncio.wait_for(link.proc.wait(), WORKER_STOP_TIMEOUT_S)
            except TimeoutError:
                log.warning("cache worker %d did not stop; killing it", link.index)
                with contextlib.suppress(ProcessLookupError):
                    link.proc.kill()
                await link.proc.wait()
            link.close()


def _forward_socket() -> tuple[socket.socket, str]:
    """A private abstract unix socket for the workers' forwarded requests."""
    name = f"bdn-cache-{os.getpid()}-{secrets.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("\0" + name)
    return sock, name


def serve(options: CacheServerOptions, listen: ListenAddress,
          store: BlobStore | None = None) -> int:
    """Run the cache on ``listen`` with ``options.workers`` processes until SIGTERM/SIGINT.

    Prints ``BDN_LISTENING <url>`` once, when every process listens (see
    :mod:`bdn.service`). ``store``: the blob store, when built with options (endpoint,
    credentials) beyond ``options.store_url``.
    """

    async def main() -> None:
        raise_fd_limit()  # before workers start: they inherit it
        server = CacheServer(options, store)
        app = server.make_app()
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                               **options.edge.handler_args())
        await runner.setup()
        assert runner.server is not None
        fast = server.fast_path()  # hits without aiohttp; all else goes to the app
        public: asyncio.Server | None = None
        pool: WorkerPool | None = None
        shared = options.workers > 1
        try:
            if listen.path:
                remove_socket_file(listen)  # a stale one from a killed server
                usock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                usock.bind(listen.path)
                public = await fast.listen(runner.server, sock=usock)
                url = f"unix:{listen.path}"
                host, port, listen_fd = "", 0, usock.fileno()  # workers share this socket
            else:
                public = await fast.listen(runner.server, host=listen.host,
                                           port=listen.port, reuse_port=shared)
                host, port, listen_fd = listen.host, public.sockets[0].getsockname()[1], -1
                shown = host if ":" not in host else f"[{host}]"
                url = f"http://{shown}:{port}"
            if shared:
                fsock, fname = _forward_socket()
                await web.SockSite(runner, fsock, backlog=FORWARD_BACKLOG).start()
                pool = WorkerPool(server, options.workers, fname, host=host, port=port,
                                  listen_fd=listen_fd)
                server.collect_worker_notes = pool.collect_notes
                await pool.start()
            app["bdn.url"] = url
            await announce_and_wait(url)
        finally:
            if pool is not None:
                pool.stop()
            await fast.shutdown(public, SHUTDOWN_TIMEOUT_S)
            await runner.cleanup()
            if pool is not None:
                await pool.wait()
            remove_socket_file(listen)

    asyncio.run(main())
    return 0


__all__ = ["WorkerLink", "WorkerPool", "serve"]
