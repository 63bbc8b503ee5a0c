"""The agent daemon: the node's local API over a unix socket (optionally loopback TCP).

Routes (JSON unless said otherwise)::

    POST   /v1/pulls               start a pull → 202 {"id", "state", "created", "token"}
                                   (Idempotency-Key header: same key + same body → same
                                   pull, 200; same key + other body → 409)
    GET    /v1/pulls               every pull's status
    GET    /v1/pulls/{id}          state, files done, bytes by tier, throughput, ETA, error
    GET    /v1/pulls/{id}/events   newline-delimited JSON events, replayed from the first
    DELETE /v1/pulls/{id}          release the pull's mounts and pins; needs the pull's
                                   token in the X-Bdn-Pull-Token header (403 otherwise)
    GET    /v1/status              node cache usage, peers, store, pulls
    GET    /healthz                "ok"
    GET    /metrics                Prometheus text

A pull body is either a ref or manifest digest::

    {"ref": "ns/model:tag" | "b3:<hex>", "mount": "/abs/dir" | null}

or ``weights:`` entries as in ``config.yaml`` (each may add ``"ref"`` to pin a manifest;
otherwise the entry resolves by ``agent.resolve.entry_target``)::

    {"weights": [{"source": "hf://org/m@rev", "mount_location": "/models/m", ...}],
     "mount_root": "/abs/dir" | null}

``mount_root`` prefixes every ``mount_location`` (tests and hosts that map pod paths);
``"prewarm": true`` fills the node cache without mounting; ``"order": "path"`` turns off
loader ordering.

Who may do what. The unix socket is created ``0660`` (owner and ``--socket-group``):
it is bound under a umask that leaves it ``0600``, then chowned and widened, so it is
never wider than asked, whatever the caller's umask. Anyone who can connect may start
and watch pulls, but releasing one (which removes a model's files) needs its *release
token*: ``HMAC-SHA256(key, pull id)``, with the key in ``<cache>/release-tokens.key``
(``0600``), so no token is stored and every pull, restored ones too, has one. The token
is returned when a pull is created. A re-post with the same ``Idempotency-Key`` returns
it again only to the same caller — the same uid (``SO_PEERCRED`` on the unix socket) as
the creator, or root — because keys are often guessable ("deploy-1") and the token must
not leak to another model's process. Over TCP the peer is unknown, so a re-post gets no
token there. Root (peer uid 0) may release without a token. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.client import TOKEN_HEADER
from agent.engine import Engine, Pull, parse_request
from agent.errors import IdempotencyConflict, RequestError
from agent.options import AgentOptions
from agent.peerserver import PeerServer, PeerServerOptions
from bdn import metrics as prom
from bdn.errors import BdnError, PathError
from bdn.service import ListenAddress, announce, signal_stop
from bdn.store import BlobStore

log = logging.getLogger(__name__)

# The line that says the peer listener is up (after the API's BDN_LISTENING lines).
PEER_READY_PREFIX = "BDN_PEER_LISTENING"
ENGINE_KEY: web.AppKey[Engine] = web.AppKey("engine", Engine)
TOKENS_KEY: web.AppKey[ReleaseTokens] = web.AppKey("release_tokens")
SOCKET_MODE = 0o660
# Bound under this umask the socket starts as 0600: narrower than SOCKET_MODE until the
# chown and chmod that follow, never wider.
BIND_UMASK = 0o177
TOKEN_KEY_FILE = "release-tokens.key"
TOKEN_KEY_BYTES = 32
MAX_REQUEST_BYTES = 8 * 1024 * 1024
# Open event streams are ended on shutdown; a handler still busy after this is cut off.
SHUTDOWN_TIMEOUT_S = 5.0


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status, dumps=lambda d: json.dumps(d, indent=None))


def _error(status: int, message: str, kind: str) -> web.Response:
    return _json({"error": message, "kind": kind}, status=status)


class ReleaseTokens:
    """Release tokens derived from a per-node key (see the module docstring)."""

    def __init__(self, cache_dir: Path) -> None:
        self.key = _load_or_create_key(Path(cache_dir) / TOKEN_KEY_FILE)

    def token(self, pull_id: str) -> str:
        return hmac.new(self.key, pull_id.encode(), hashlib.sha256).hexdigest()

    def check(self, pull_id: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.token(pull_id), str(token))


def _load_or_create_key(path: Path) -> bytes:
    with contextlib.suppress(FileNotFoundError):
        return _read_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secrets.token_bytes(TOKEN_KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a key another agent wrote meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_bytes()
    if len(key) != TOKEN_KEY_BYTES:
        raise PathError(f"{path} holds {len(key)} bytes, not a {TOKEN_KEY_BYTES}-byte key; "
                        "remove it to make a new one (outstanding release tokens then "
                        "stop working)", field="cache_dir")
    return key


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process at the other end of a unix socket; None over TCP."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def _may_see_token(pull: Pull, uid: int | None, created: bool) -> bool:
    if created:
        return True
    return uid is not None and (uid == 0 or uid == pull.owner_uid)


async def post_pull(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(400, "the request body is not JSON", "RequestError")
    uid = peer_uid(request)
    try:
        pull_request = parse_request(body)
        pull, created = await engine.submit(pull_request, request.headers.get("Idempotency-Key"),
                                            owner_uid=uid)
    except IdempotencyConflict as e:
        return _error(409, str(e), type(e).__name__)
    except (RequestError, PathError) as e:
        return _error(400, str(e), type(e).__name__)
    doc = {"id": pull.id, "state": pull.state, "created": created,
           "events": f"/v1/pulls/{pull.id}/events"}
    if _may_see_token(pull, uid, created):
        doc["token"] = request.app[TOKENS_KEY].token(pull.id)
    return _json(doc, status=202 if created else 200)


def _pull(request: web.Request) -> Any:
    engine = request.app[ENGINE_KEY]
    pull = engine.pulls.get(request.match_info["id"])
    if pull is None:
        raise web.HTTPNotFound(text=json.dumps({"error": "no such pull", "kind": "NotFound"}),
                               content_type="application/json")
    return pull


async def get_pull(request: web.Request) -> web.Response:
    return _json(_pull(request).status())


async def list_pulls(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    return _json({"pulls": [p.status() for p in engine.pulls.values()]})


async def pull_events(request: web.Request) -> web.StreamResponse:
    pull = _pull(request)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                       "Cache-Control": "no-store"})
    await resp.prepare(request)
    try:
        batch: list[bytes] = []
        async for ev in pull.follow():
            batch.append(ev.to_line())
            # Replayed history goes out in large writes, live events one by one.
            if len(batch) >= 256 or ev.FINAL or not (
                    pull.events and ev is not pull.events[-1]):
                await resp.write(b"".join(batch))
                batch = []
        if batch:
            await resp.write(b"".join(batch))
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    return resp


async def delete_pull(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    pull = _pull(request)
    if peer_uid(request) != 0 and not request.app[TOKENS_KEY].check(
            pull.id, request.headers.get(TOKEN_HEADER)):
        return _error(403, f"releasing pull {pull.id} needs the token returned when it was "
                      f"created, in the {TOKEN_HEADER} header", "AccessDenied")
    await engine.release(pull.id)
    return _json(pull.status())


async def status(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    opts = engine.options
    states: dict[str, int] = {}
    for p in engine.pulls.values():
        states[p.state] = states.get(p.state, 0) + 1
    return _json({"cache_dir": str(opts.cache_dir), "node_cache": engine.node.stats(),
                  "peers": list(opts.peers), "store": opts.store_url, "strict": opts.strict,
                  "ring_client": engine.ring is not None, "pulls": states,
                  "counters": dict(engine.counters),
                  "active": [p.status() for p in engine.pulls.values()
                             if p.state in ("queued", "running")]})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    return prom.metrics_response(request.app[ENGINE_KEY].registry, request)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except BdnError as e:
        return _error(400 if isinstance(e, ValueError) else 500, str(e), type(e).__name__)


async def make_app(options: AgentOptions, store: BlobStore | None = None
                   ) -> web.Application:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[errors_middleware])
    engine = Engine(options, store=store)
    app[ENGINE_KEY] = engine
    app[TOKENS_KEY] = ReleaseTokens(options.cache_dir)
    resumed = engine.restore()
    if resumed:
        log.info("resuming %d unfinished pull(s)", len(resumed))

    async def shutdown(_app: web.Application) -> None:
        engine.close_streams()

    async def cleanup(_app: web.Application) -> None:
        await engine.close()
    app.on_shutdown.append(shutdown)
    app.on_cleanup.append(cleanup)
    app.router.add_post("/v1/pulls", post_pull)
    app.router.add_get("/v1/pulls", list_pulls)
    app.router.add_get("/v1/pulls/{id}", get_pull)
    app.router.add_get("/v1/pulls/{id}/events", pull_events)
    app.router.add_delete("/v1/pulls/{id}", delete_pull)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def resolve_group(group: str | None) -> int | None:
    """A group name or number (``--socket-group``) as a gid; None keeps the default."""
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise RequestError(f"--socket-group {group!r}: no such group") from None


def bind_unix_socket(path: str, gid: int | None = None) -> socket.socket:
    """Bind the API socket at ``path`` with mode 0660 (group ``gid``), whatever the umask.

    Called before the event loop and its threads start: the umask is process-wide, and
    nothing else creates files while it is narrowed. A stale socket at ``path`` is
    replaced; anything else there is refused, never deleted.
    """
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise PathError(f"--socket {path} exists and is not a socket; refusing to "
                            "replace it", field="socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(BIND_UMASK)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, SOCKET_MODE)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return sock


def run_daemon(options: AgentOptions, socket_path: str | None,
               listen: str | None = None, *, socket_group: str | None = None,
               store: BlobStore | None = None) -> int:
    """Serve on the unix socket and/or a loopback TCP address until SIGTERM/SIGINT.

    Prints ``BDN_LISTENING <url>`` once per bound address (the unix socket first).
    ``socket_group``: group name or gid that may use the socket (mode 0660).
    """
    if socket_path is None and listen is None:
        raise RequestError("the agent needs --socket PATH or --listen HOST:PORT")
    unix_sock = (bind_unix_socket(socket_path, resolve_group(socket_group))
                 if socket_path else None)
    unix_ident = _ident(socket_path) if socket_path else None

    async def main() -> None:
        app = await make_app(options, store)
        runner = web.AppRunner(app, handle_signals=False, access_log=None,
                               shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        peer_runner: web.AppRunner | None = None
        try:
            if options.peer_listen:
                peer_runner = await start_peer_listener(options, app[ENGINE_KEY])
            if unix_sock is not None:
                await web.SockSite(runner, unix_sock).start()
                announce(f"unix:{socket_path}")
            if listen:
                addr = ListenAddress.parse(listen)
                site = web.TCPSite(runner, addr.host, addr.port, reuse_address=True)
                await site.start()
                server = site._server  # aiohttp has no public accessor for the port
                assert server is not None and server.sockets
                announce(f"http://{addr.host}:{server.sockets[0].getsockname()[1]}")
            await signal_stop().wait()
        finally:
            if peer_runner is not None:
                await peer_runner.cleanup()
            await runner.cleanup()

    try:
        asyncio.run(main())
    finally:
        if unix_sock is not None:
            unix_sock.close()
        # Only our own socket: another agent may have taken the path over since.
        if socket_path and unix_ident is not None and _ident(socket_path) == unix_ident:
            os.unlink(socket_path)
    return 0


async def start_peer_listener(options: AgentOptions, engine: Engine) -> web.AppRunner:
    """Serve this node's verified chunks to other agents on ``options.peer_listen``
    (:mod:`agent.peerserver`); prints ``BDN_PEER_LISTENING <url>`` once bound."""
    assert options.peer_listen is not None
    addr = ListenAddress.parse(options.peer_listen)
    if addr.path is not None:
        raise RequestError("--peer-listen must be HOST:PORT (other nodes reach it over TCP)")
    server = PeerServer(engine.node, PeerServerOptions(
        max_uploads=options.peer_max_uploads,
        upload_rate_bytes_per_s=options.peer_upload_rate_bytes_per_s),
        counters=engine.counters, receiving=engine.files.inflight.get)
    runner = web.AppRunner(server.make_app(), handle_signals=False, access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, addr.host, addr.port, reuse_address=True)
    await site.start()
    bound = site._server  # aiohttp has no public accessor for the port
    assert bound is not None and bound.sockets
    port = bound.sockets[0].getsockname()[1]
    print(f"{PEER_READY_PREFIX} http://{addr.host}:{port}", flush=True)
    return runner


def _ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
