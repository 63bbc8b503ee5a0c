"""A hit worker of ``bdn cache-server --workers N``: serves complete objects, forwards the rest.

Started by the owner process (:mod:`cache.workers`) as ``python -m cache.worker`` with
its options on the command line. It listens on the cache's public port beside the owner
(``SO_REUSEPORT``: the kernel spreads connections over the processes), and:

- ``GET|HEAD /v1/objects/{digest}`` of a complete object is answered here, with
  ``sendfile`` and the same ``Range``/``ETag``/``HEAD``/416 semantics as the owner
  (:mod:`cache.send`) — by the hit fast path (:mod:`cache.fastpath`) as the owner's
  are, or by this worker's aiohttp app on a connection handed to it. A complete
  object is a file under ``objects/``: the disk store gives a file that name only
  after its fill was verified (:mod:`cache.disk`), so "the file opened" means
  "complete and verified". The file is opened *first* and every byte is read from
  that descriptor, so an eviction after the open (an unlink) cannot take the bytes
  away from this reader.
- everything else — misses (to be filled, once, by the owner), manifests, refs, verify,
  prefetch, metrics, health — is forwarded as is to the owner over its private unix
  socket, and its answer streamed back (with ``X-Bdn-Via: <index>``); a forwarded body
  that breaks off breaks the client's connection too (never a clean end of a short
  body).

It never opens the LMDB index or takes the cache folder's lock: it only reads object
files. It pins what it sends as :mod:`cache.disk` expects of other processes: a shared
``flock`` on the open file, held until just before the response's last byte (so a
client that has its whole body and then makes the owner evict finds the object free; the
descriptor keeps the last byte readable either way). Hits, bytes and access times are
counted here and told to the owner over the control socket (a ``socketpair`` end
inherited from it), batched: every ``NOTES_INTERVAL_S`` and whenever the owner asks
(``S <n>`` before it answers ``/metrics``: the pending notes, then ``s <n>``). A hit is
counted before its first byte, so ``/metrics`` read after a response completed includes
it. Lines to the owner: ``C <hits> <bytes>``, ``A <hex> <unix time>`` (an access, for
the LRU), ``R <pid>`` (listening), ``s <n>``.

The worker dies with the owner: ``PR_SET_PDEATHSIG`` (SIGKILL) is set as it starts, and
the end of the control socket (the owner exited) stops it too; SIGTERM/SIGINT stop it
gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from yarl import URL

from bdn.service import SHUTDOWN_TIMEOUT_S, signal_stop
from cache.disk import object_relpath
from cache.edge import EdgeOptions, head_limit_middleware
from cache.fastpath import FastPath, OpenObject, answer_hit
from cache.send import OCTET_STREAM, Sender, abort, object_headers
from manifests.digest import ALGORITHM, HEX_LENGTH

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
LINE_ENCODING = "ascii"
# How often hits and accesses are told to the owner (and whenever it asks: /metrics).
NOTES_INTERVAL_S = 1.0
FORWARD_CONNECT_TIMEOUT_S = 10.0
FORWARD_MAX_BODY_BYTES = 64 * 1024 * 1024
FORWARD_READ_BUFFER_BYTES = 1024 * 1024
# Forwarded bodies this large are relayed with splice (cache.send) rather than copied.
SPLICE_MIN_BYTES = 256 * 1024
RETRY_AFTER_S = 1
_DEFAULT_EDGE = EdgeOptions()  # frozen: one shared default
# On a forwarded response: the worker that took the request (the owner answered it).
VIA_HEADER = "X-Bdn-Via"
_DIGEST_RE = re.compile(rf"{ALGORITHM}:([0-9a-f]{{{HEX_LENGTH}}})")
# Not forwarded either way (RFC 9110 §7.6.1), plus what the client library sets itself.
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate",
                         b"proxy-authorization", b"te", b"trailer", b"transfer-encoding",
                         b"upgrade", b"host", b"content-length"})


@dataclass(frozen=True)
class WorkerOptions:
    """One worker's settings, as the owner passes them (see :func:`WorkerOptions.argv`).

    ``index`` ≥ 1 names the worker (the owner is 0) in ``X-Bdn-Worker`` and
    ``/metrics``; ``owner_pid`` is the process it must die with; ``control_fd`` its
    inherited end of the control socket; ``forward_socket`` the owner's private
    abstract unix socket name (without the leading NUL); ``objects_dir`` the disk
    store's ``objects/`` folder; ``send_threads`` as for the owner; ``edge`` the owner's
    connection timeouts; ``log_level`` the owner's. It listens either on
    ``host``:``port`` (``SO_REUSEPORT``, beside the owner) or on the inherited listening
    socket ``listen_fd`` (a unix socket shared with the owner).
    """

    index: int
    owner_pid: int
    control_fd: int
    forward_socket: str
    objects_dir: str
    send_threads: int
    edge: EdgeOptions = _DEFAULT_EDGE
    host: str = ""
    port: int = 0
    listen_fd: int = -1
    log_level: int = logging.WARNING

    def __post_init__(self) -> None:
        if self.index < 1:
            raise ValueError("WorkerOptions.index must be ≥ 1 (0 is the owner)")
        if self.owner_pid <= 1 or self.control_fd < 0:
            raise ValueError("WorkerOptions: owner_pid and control_fd are required")
        if not self.forward_socket or not self.objects_dir:
            raise ValueError("WorkerOptions: forward_socket and objects_dir are required")
        if self.send_threads < 0:
            raise ValueError("WorkerOptions.send_threads must be ≥ 0")
        if (self.listen_fd < 0) == (not self.host or self.port <= 0):
            raise ValueError("WorkerOptions: give either host and port, or listen_fd")

    def argv(self) -> list[str]:
        out = ["--index", str(self.index), "--owner-pid", str(self.owner_pid),
               "--control-fd", str(self.control_fd), "--forward-socket", self.forward_socket,
               "--objects-dir", self.objects_dir, "--send-threads", str(self.send_threads),
               "--log-level", str(self.log_level), *self.edge.argv()]
        if self.listen_fd >= 0:
            return [*out, "--listen-fd", str(self.listen_fd)]
        return [*out, "--host", self.host, "--port", str(self.port)]

    @classmethod
    def parse(cls, argv: Sequence[str]) -> WorkerOptions:
        ap = argparse.ArgumentParser(prog="python -m cache.worker")
        ap.add_argument("--index", type=int, required=True)
        ap.add_argument("--owner-pid", type=int, required=True)
        ap.add_argument("--control-fd", type=int, required=True)
        ap.add_argument("--forward-socket", required=True)
        ap.add_argument("--objects-dir", required=True)
        ap.add_argument("--send-threads", type=int, required=True)
        ap.add_argument("--host", default="")
        ap.add_argument("--port", type=int, default=0)
        ap.add_argument("--listen-fd", type=int, default=-1)
        ap.add_argument("--log-level", type=int, default=logging.WARNING)
        edge = EdgeOptions()
        ap.add_argument("--idle-timeout", type=float, default=edge.idle_timeout_s)
        ap.add_argument("--header-timeout", type=float, default=edge.header_timeout_s)
        ap.add_argument("--body-timeout", type=float, default=edge.body_timeout_s)
        a = ap.parse_args(list(argv))
        return cls(index=a.index, owner_pid=a.owner_pid, control_fd=a.control_fd,
                   forward_socket=a.forward_socket, objects_dir=a.objects_dir,
                   send_threads=a.send_threads,
                   edge=EdgeOptions(a.idle_timeout, a.header_timeout, a.body_timeout),
                   host=a.host, port=a.port,
                   listen_fd=a.listen_fd, log_level=a.log_level)


def die_with_owner(owner_pid: int) -> None:
    """Be killed when the owner dies (``PR_SET_PDEATHSIG``); exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != owner_pid:  # the owner died before the line above
        os._exit(0)


class ControlLines(asyncio.Protocol):
    """One end of the owner–worker control socket: ASCII lines (see the module docstring),
    each handed to :meth:`line_received`."""

    def __init__(self) -> None:
        self._transport: asyncio.WriteTransport | None = None
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        *lines, self._buf = (self._buf + data).split(b"\n")
        for line in lines:
            self.line_received(line)

    def line_received(self, line: bytes) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def send(self, text: str) -> bool:
        """Write one or more lines; False when the other end is gone."""
        if self._transport is None or self._transport.is_closing():
            return False
        self._transport.write(text.encode(LINE_ENCODING))
        return True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class OwnerLink(ControlLines):
    """The worker's end of the control socket."""

    def __init__(self, on_sync: Callable[[], None], on_lost: Callable[[], None]) -> None:
        super().__init__()
        self._on_sync = on_sync
        self._on_lost = on_lost

    def line_received(self, line: bytes) -> None:
        kind, _, rest = line.partition(b" ")
        if kind == b"S":
            self._on_sync()  # notes first: the owner reads them before the answer
            self.send(f"s {rest.decode(LINE_ENCODING)}\n")

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._on_lost()


class Notes:
    """Hits, bytes and accesses of this worker not yet told to the owner."""

    def __init__(self) -> None:
        self.hits = 0
        self.bytes = 0
        self.accessed: dict[str, float] = {}

    def hit(self, hex_: str, nbytes: int) -> None:
        self.hits += 1
        self.bytes += nbytes
        self.accessed[hex_] = time.time()

    def lines(self) -> str:
        """The pending notes as lines (empty if none), and forget them."""
        if not (self.hits or self.bytes or self.accessed):
            return ""
        out = [f"C {self.hits} {self.bytes}\n"]
        out += [f"A {h} {t!r}\n" for h, t in self.accessed.items()]
        self.hits = self.bytes = 0
        self.accessed = {}
        return "".join(out)


class WorkerServer:
    """The worker's HTTP handlers (see module docstring)."""

    def __init__(self, options: WorkerOptions) -> None:
        self.options = options
        self.link: OwnerLink | None = None
        self.notes = Notes()
        self.sender = Sender(options.send_threads)
        self._worker = str(options.index)
        self._objects = options.objects_dir.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._notes_task: asyncio.Task[None] | None = None

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=FORWARD_MAX_BODY_BYTES,
                              middlewares=[head_limit_middleware])
        app.router.add_route("GET", "/v1/objects/{digest}", self.handle_object)
        app.router.add_route("HEAD", "/v1/objects/{digest}", self.handle_object)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)
        return app

    def flush_notes(self) -> None:
        if self.link is not None:
            text = self.notes.lines()
            if text:
                self.link.send(text)

    async def _notes_loop(self) -> None:
        while True:
            await asyncio.sleep(NOTES_INTERVAL_S)
            self.flush_notes()

    async def _on_startup(self, app: web.Application) -> None:
        connector = aiohttp.UnixConnector(path="\0" + self.options.forward_socket, limit=0)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=FORWARD_CONNECT_TIMEOUT_S),
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"),
            read_bufsize=FORWARD_READ_BUFFER_BYTES)
        self._notes_task = asyncio.create_task(self._notes_loop())

    async def _on_shutdown(self, app: web.Application) -> None:
        self.sender.stop()  # sends to stalled clients end within SEND_POLL_SLICE_S

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._notes_task is not None:
            self._notes_task.cancel()
        self.flush_notes()
        self.sender.close()
        if self._session is not None:
            await self._session.close()

    hooks_last_byte = True  # the flock is dropped before the last byte

    def open_hit(self, hex_: str) -> OpenObject | None:
        """The complete object's file, opened and pinned (a shared ``flock``, see
        :mod:`cache.disk`), and its size; None if it is not here for us to serve."""
        try:
            # Opened before anything else: from here on the bytes are ours to read even
            # if the object is evicted (unlinked).
            f = open(f"{self._objects}/{object_relpath(hex_)}", "rb")
        except OSError:
            return None  # absent, or still filling (only verified fills get this name)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            st = os.fstat(f.fileno())
        except OSError:  # BlockingIOError: the owner is evicting it right now
            f.close()
            return None
        if st.st_nlink == 0:  # evicted between the open and the lock
            f.close()
            return None
        return OpenObject(f, st.st_size)

    def hit_started(self, obj: OpenObject, hex_: str, nbytes: int) -> None:
        # Counted before the first byte: /metrics asked after the response is complete
        # includes it (the owner collects notes first, see cache.workers).
        self.notes.hit(hex_, nbytes)

    def before_last_byte(self, obj: OpenObject) -> None:
        # Unpinned before the last byte: a client that has it all and makes the owner
        # evict next finds the object free (the bytes stay readable here).
        fcntl.flock(obj.file.fileno(), fcntl.LOCK_UN)

    def hit_ended(self, obj: OpenObject, nbytes: int, whole: bool) -> None:
        obj.file.close()
        if not whole:
            self.notes.bytes -= nbytes

    def fast_path(self) -> FastPath:
        """This worker's fast path for hits, in front of :meth:`make_app`'s app."""
        return FastPath(self, self.sender, self._worker, self.options.edge)

    async def handle_object(self, request: web.Request) -> web.StreamResponse:
        text = request.match_info["digest"]
        m = _DIGEST_RE.fullmatch(text)
        if m is None:
            return await self.forward(request)  # the owner words the 400
        hex_ = m.group(1)
        obj = self.open_hit(hex_)
        if obj is None:
            return await self.forward(request)  # absent, filling or being evicted
        headers = object_headers(text, OCTET_STREAM, "hit", self._worker)
        return await answer_hit(request, self, self.sender, obj, hex_, headers)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Send the request to the owner and stream its answer back."""
        assert self._session is not None
        # Raw headers: names keep their case (the parsed ones are normalised).
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in request.raw_headers if k.lower() not in _HOP_BY_HOP]
        try:
            async with asyncio.timeout(self.options.edge.body_timeout_s):
                body = await request.read() if request.body_exists else None
        except TimeoutError:
            return web.json_response(
                {"error": f"request body not received within "
                          f"{self.options.edge.body_timeout_s:g} s"},
                status=408, headers={"Connection": "close"})
        url = URL("http://bdn-cache-owner" + request.raw_path, encoded=True)
        try:
            upstream = await self._session.request(request.method, url, headers=headers,
                                                   data=body, allow_redirects=False)
        except (aiohttp.ClientError, OSError) as e:
            return web.json_response(
                {"error": f"cache worker {self._worker} could not reach the cache's owner "
                          f"process: {type(e).__name__}: {e}"},
                status=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        async with upstream:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.raw_headers:
                if k.lower() not in _HOP_BY_HOP:
                    resp.headers.add(k.decode("latin-1"), v.decode("latin-1"))
            resp.headers[VIA_HEADER] = self._worker
            text = upstream.headers.get("Content-Length")
            length = int(text) if text is not None and text.isdigit() else None
            if length is not None:
                resp.content_length = length
            try:
                await resp.prepare(request)
                if request.method == "HEAD":
                    pass
                elif length is not None and length >= SPLICE_MIN_BYTES:
                    await self._relay(request, resp, upstream, length)
                else:
                    async for block in upstream.content.iter_any():
                        await resp.write(block)
                await resp.write_eof()
            except (TimeoutError, aiohttp.ClientError, ConnectionError):
                # The owner broke off (a fill that failed verification) or the client
                # went away: never a clean end of a short body.
                abort(request)
            return resp

    async def _relay(self, request: web.Request, resp: web.StreamResponse,
                     upstream: aiohttp.ClientResponse, length: int) -> None:
        """Pass a large forwarded body (a miss streamed from its fill) on with
        ``splice``: what the client library already read goes first, the rest moves
        socket to socket through a pipe, never through this process's memory."""
        conn = upstream.connection
        transport = conn.transport if conn is not None else None
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or sock is None:
            async for block in upstream.content.iter_any():
                await resp.write(block)
            return
        # Same loop tick: nothing can arrive between taking the buffer and pausing.
        buffered = upstream.content.read_nowait()
        transport.pause_reading()
        src = os.dup(sock.fileno())
        upstream.close()  # the rest of its body is ours to read: never reuse it
        try:
            if buffered:
                await resp.write(buffered)
            left = length - len(buffered)
            if left > 0 and not await self.sender.splice_from(request, src, left):
                raise ConnectionResetError("the client connection offers no socket")
        finally:
            os.close(src)


async def run(options: WorkerOptions) -> None:
    loop = asyncio.get_running_loop()
    stop = signal_stop()
    server = WorkerServer(options)
    control = socket.socket(fileno=options.control_fd)
    _, link = await loop.connect_accepted_socket(
        lambda: OwnerLink(server.flush_notes, stop.set), control)
    server.link = link
    runner = web.AppRunner(server.make_app(), handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                           **options.edge.handler_args())
    await runner.setup()
    assert runner.server is not None
    fast = server.fast_path()  # hits without aiohttp; all else goes to the app
    public: asyncio.Server | None = None
    try:
        if options.listen_fd >= 0:
            public = await fast.listen(runner.server,
                                       sock=socket.socket(fileno=options.listen_fd))
        else:
            public = await fast.listen(runner.server, host=options.host, port=options.port,
                                       reuse_port=True)
        link.send(f"R {os.getpid()}\n")
        await stop.wait()
    finally:
        await fast.shutdown(public, SHUTDOWN_TIMEOUT_S)
        await runner.cleanup()
        link.close()


def main(argv: Sequence[str] | None = None) -> int:
    options = WorkerOptions.parse(sys.argv[1:] if argv is None else argv)
    die_with_owner(options.owner_pid)
    logging.basicConfig(level=options.log_level, format="%(asctime)s %(levelname)s "
                        f"%(name)s[worker {options.index}]: %(message)s")
    from bdn.secrets import install_log_scrubber

    install_log_scrubber()  # a separate entry point from ``bdn``: it installs its own
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(options))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
